"""AdamW step time: torch's per-tensor loop, foreach and fused kernels, on the same parameters and gradients.

    python bench/bench_optimizer.py [--params-m 50] [--device cpu]
"""

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params-m", type=int, default=50, help="millions of parameters, as 1024x1024 matrices + biases")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    n = max(1, a.params_m * 2**20 // (1024 * 1024 + 1024))
    params = [torch.nn.Parameter(torch.randn(*s, device=a.device)) for _ in range(n) for s in ((1024, 1024), (1024,))]
    for p in params:
        p.grad = torch.randn_like(p)
    times = {}
    for name, kw in {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items():
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **kw)
        opt.step()  # state allocated
        t = time.perf_counter()
        for _ in range(5):
            opt.step()
        if a.device == "cuda":
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t) / 5
    total = sum(p.numel() for p in params)
    print(f"{total / 1e6:.1f}M parameters on {a.device}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
          + f"; fused is {times['for-loop'] / times['fused']:.2f}x the for-loop, {times['foreach'] / times['fused']:.2f}x foreach")


if __name__ == "__main__":
    main()
