"""Size, save time and load time of a resumable checkpoint of a bigger model, through train.py itself.

    python bench/bench_checkpoint.py                       # 2 ranks, FSDP2, a 250M-parameter Llama shape, fp32
    python bench/bench_checkpoint.py --layers 32 --nproc 8  # any other size

A random-init Llama of the given shape (the quickstart tokenizer) trains 2 steps on quickstart chats and saves at
the end (model + AdamW state, sharded by torch.distributed.checkpoint); a second launch resumes from it for one
more step. Reported: the figures train.py prints (`saved ... (MiB) in s`, `loaded ... in s`) and the wall times.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="fsdp2")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(ROOT / "data/quickstart/model", tmp / "model")
    cfg = json.loads((tmp / "model/config.json").read_text())
    cfg |= {"hidden_size": a.hidden, "intermediate_size": 4 * a.hidden, "num_hidden_layers": a.layers,
            "num_attention_heads": a.hidden // 64, "num_key_value_heads": a.hidden // 128, "head_dim": 64}
    (tmp / "model/config.json").write_text(json.dumps(cfg))
    args = ["--config", "configs/quickstart.yaml", f"--model.path={tmp / 'model'}", f"--train.output_dir={tmp / 'run'}",
            f"--data.cache_dir={tmp / 'cache'}", "--train.heldout_file=", "--sampler.batch_size=8",
            f"--sharding.strategy={a.strategy}", "--logging.log_every_steps=1"]
    out = {"hidden": a.hidden, "layers": a.layers, "nproc": a.nproc, "strategy": a.strategy}
    for name, steps in (("first", 2), ("resumed", 3)):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}", "train.py",
                            *args, f"--train.max_steps={steps}"], cwd=ROOT, capture_output=True, text=True,
                           env=os.environ | {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // a.nproc))})
        if p.returncode:
            sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
        out[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        for line in p.stdout.splitlines():
            if m := re.search(r"saved .*step-(\d+) \(([\d.]+) MiB\) in ([\d.]+)s", line):
                out[f"save_step{m[1]}"] = {"mib": float(m[2]), "s": float(m[3])}
            if m := re.search(r"loaded .* in ([\d.]+)s", line):
                out["load_s"] = float(m[1])
            if m := re.search(r"(\d[\d,]*) parameters", line):
                out["parameters"] = m[1]
    print(json.dumps(out, indent=1))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
