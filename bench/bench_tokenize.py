"""Tokenization throughput and peak memory: our whole `tokenize_data.py` process against TRL's SFTTrainer dataset
preparation (a whole process too: load the JSONL with datasets, build the trainer, which applies the chat template
and tokenizes), on the same synthetic multi-turn chats (long-tailed lengths), tokenizer and template.

    python bench/bench_tokenize.py --samples 40000 --num-proc 2          # ours vs TRL
    python bench/bench_tokenize.py --samples 1000000 --num-proc 2 --only ours

Peak memory is the largest sum of the resident set sizes of the process and its children, sampled every 50 ms.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not but which one all "
         "were can there their more will about would when what some into time than other model data token train "
         "answer question because system value number first people way could make like these two may").split()

TRL = """
import sys, datasets
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[2]))
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
args = SFTConfig(output_dir=sys.argv[3], dataset_num_proc=int(sys.argv[4]), max_length=None, packing=False,
                 report_to=[], use_cpu=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
print(len(trainer.train_dataset))
"""


def make_chats(path: Path, n: int, seed: int = 0):
    """n chats of 1-4 exchanges; turn lengths lognormal (median ~40 words, long tail), some with a system turn."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(int(rng.integers(1, 5))):
                for role in ("user", "assistant"):
                    k = int(np.clip(rng.lognormal(np.log(40 if role == "assistant" else 15), 1.0), 1, 1500))
                    msgs.append({"role": role, "content": " ".join(rng.choice(WORDS, k))})
            f.write(json.dumps({"messages": msgs}) + "\n")


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    top, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [top] + top.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{out[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_gib": peak / 2**30, "output": out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_tokenize"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.work / f"chats{a.samples}.jsonl"
    if not data.exists():
        make_chats(data, a.samples)
    model = ROOT / "data/quickstart/model"
    results = {}
    if a.only in (None, "ours"):
        cache = a.work / "cache"
        subprocess.run(["rm", "-rf", str(cache)])
        r = measure([sys.executable, "tokenize_data.py", "--config", "configs/quickstart.yaml",
                     f"--data.train_files=[{data}]", "--data.eval_files=[]", f"--data.cache_dir={cache}",
                     "--data.max_seq_len=1000000", f"--data.num_proc={a.num_proc}"])
        results["ours"] = r
    if a.only in (None, "trl"):
        subprocess.run(["rm", "-rf", str(a.work / "trl")])
        results["trl"] = measure([sys.executable, "-c", TRL, str(data), str(model), str(a.work / "trl"),
                                  str(a.num_proc)])
    for name, r in results.items():
        print(f"{name}: {a.samples} samples in {r['wall_s']:.1f} s = {a.samples / r['wall_s']:.0f} samples/s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    if len(results) == 2:
        print(f"ours / TRL: {results['trl']['wall_s'] / results['ours']['wall_s']:.2f}x samples/s, "
              f"{results['ours']['peak_rss_gib'] / results['trl']['peak_rss_gib']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
