"""Tokenization throughput and peak memory: our whole `tokenize_data.py` process against TRL's SFTTrainer dataset
preparation (a whole process too: load the JSONL with datasets, build the trainer, which applies the chat template
and tokenizes), on the same synthetic multi-turn chats (long-tailed lengths), tokenizer and template.

    python bench/bench_tokenize.py --samples 40000 --num-proc 2 [--tokenizer bpe32k]   # ours vs TRL
    python bench/bench_tokenize.py --samples 1000000 --num-proc 2 --only ours

--tokenizer quickstart is the shipped 334-token toy vocabulary (about one token per character, so tokenizing
dominates); bpe32k is a 32,000-token byte-level BPE trained on the benchmark's own text, with Qwen2.5's chat
template and special tokens (../shared/templates), about as many tokens per word as a real model's tokenizer.

Peak memory is the largest sum over the process and its children, sampled every 200 ms, of the proportional set
size (PSS: resident memory, pages shared between processes split among them, so forked workers are not counted
twice), and of its anonymous part alone (Pss_Anon: without the pages of memory-mapped files, Arrow's and the
cache's, which the kernel drops under pressure).
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
SYLLABLES = [c + v for c in "bdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def vocabulary(n: int = 50000, seed: int = 0) -> np.ndarray:
    """n distinct pseudo-words of 1-4 syllables; sampled by Zipf rank they have the long tail of real text."""
    rng, words = np.random.default_rng(seed), {}
    while len(words) < n:
        words.setdefault("".join(rng.choice(SYLLABLES, int(rng.integers(1, 5)))), None)
    return np.array(list(words))


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


def bpe32k(data: Path, out: Path) -> Path:
    """A 32k byte-level BPE trained on `data`'s text, with Qwen2.5's template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return out
    shared = ROOT.parent / "shared/templates"
    special = json.loads((shared / "tokens.json").read_text())["qwen2_5"]
    specials = [special["pad"], *special["special_tokens"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    lines = (m["content"] for line in open(data) for m in json.loads(line)["messages"])
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=32000, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special["eos"], pad_token=special["pad"])
    fast.chat_template = (shared / "qwen2_5.jinja").read_text()
    fast.save_pretrained(out)
    (out / "config.json").write_text((ROOT / "data/quickstart/model/config.json").read_text())
    return out


def make_chats(path: Path, n: int, seed: int = 0):
    """n chats of 1-4 exchanges; turn lengths lognormal (median ~40 words, long tail), words Zipf-distributed,
    some chats with a system turn."""
    rng, words = np.random.default_rng(seed), vocabulary()
    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(int(rng.integers(1, 5))):
                for role in ("user", "assistant"):
                    k = int(np.clip(rng.lognormal(np.log(40 if role == "assistant" else 15), 1.0), 1, 1500))
                    rank = np.minimum(rng.zipf(1.1, k), len(words)) - 1
                    msgs.append({"role": role, "content": " ".join(words[rank]) + "."})
            f.write(json.dumps({"messages": msgs}) + "\n")


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    top, peak, anon = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            sizes = [pss(p.pid) for p in [top] + top.children(recursive=True)]
            peak, anon = max(peak, sum(s for s, _ in sizes)), max(anon, sum(a for _, a in sizes))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{out[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_pss_gib": peak / 2**30, "peak_anon_gib": anon / 2**30,
            "output": out}


def pss(pid: int) -> tuple[int, int]:
    """(PSS, its anonymous part) of a process in bytes, from /proc/<pid>/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split()[:2] for line in f if line.startswith(("Pss:", "Pss_Anon:")))
    return int(fields.get("Pss:", 0)) * 1024, int(fields.get("Pss_Anon:", 0)) * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--tokenizer", choices=["quickstart", "bpe32k"], default="quickstart")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_tokenize"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.work / f"chats{a.samples}.jsonl"
    if not data.exists():
        make_chats(data, a.samples)
    model = ROOT / "data/quickstart/model" if a.tokenizer == "quickstart" else bpe32k(data, a.work / "bpe32k")
    results = {}
    if a.only in (None, "ours"):
        cache = a.work / "cache"
        subprocess.run(["rm", "-rf", str(cache)])
        r = measure([sys.executable, "tokenize_data.py", "--config", "configs/quickstart.yaml", f"--model.path={model}",
                     f"--data.train_files=[{data}]", "--data.eval_files=[]", f"--data.cache_dir={cache}",
                     "--data.max_seq_len=1000000", f"--data.num_proc={a.num_proc}"])
        results["ours"] = r
    if a.only in (None, "trl"):
        subprocess.run(["rm", "-rf", str(a.work / "trl")])
        results["trl"] = measure([sys.executable, "-c", TRL, str(data), str(model), str(a.work / "trl"),
                                  str(a.num_proc)])
    for name, r in results.items():
        print(f"{name}: {a.samples} samples in {r['wall_s']:.1f} s = {a.samples / r['wall_s']:.0f} samples/s, "
              f"peak PSS {r['peak_pss_gib']:.2f} GiB, of which anonymous {r['peak_anon_gib']:.2f} GiB")
    if len(results) == 2:
        print(f"ours / TRL: {results['trl']['wall_s'] / results['ours']['wall_s']:.2f}x samples/s, "
              f"{results['ours']['peak_pss_gib'] / results['trl']['peak_pss_gib']:.2f}x peak PSS")


if __name__ == "__main__":
    main()
