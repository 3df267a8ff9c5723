"""The worked forks: each patch of forks/ changes one stage file by at most 60 lines, applies to this tree, is
shown whole in docs/forks.md, and does what that page claims: forks/test_forks.py, run in a copy of the repository
with every patch applied, and a two-rank run of the patched trainer (sign-compressed gradients, Muon with its
checkpoint, the loss-prioritized sampler fed by the run's per-sample losses, NEFTune)."""

import re
import shutil
import subprocess
import sys

from conftest import ROOT, metrics, run_args, torchrun_in, write_jsonl

PATCHES = sorted((ROOT / "forks").glob("*.patch"))


def test_each_fork_changes_one_stage_file_and_is_shown_in_the_docs():
    docs = (ROOT / "docs/forks.md").read_text()
    stage_files = {"tokenize_data.py", "model_setup.py", "sharding.py", "sampler.py", "checkpoint.py", "train.py",
                   "logging_utils.py"}
    assert len(PATCHES) == 4
    for patch in PATCHES:
        text = patch.read_text()
        files = re.findall(r"^\+\+\+ b/(.+)$", text, re.M)
        changed = [line for line in text.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        assert len(files) == 1 and files[0] in stage_files and len(changed) <= 60, (patch.name, files, len(changed))
        assert f"```diff\n{text}```" in docs, f"docs/forks.md does not show {patch.name} as it is"


def test_forks_apply_and_do_what_the_docs_say(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "runs", ".cache", "__pycache__", "*.egg-info"))
    for patch in PATCHES:
        subprocess.run(["git", "apply", str(patch)], cwd=copy, check=True)
    tests = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "forks/test_forks.py"],
                             cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # meanwhile:
    data = write_jsonl(tmp_path / "d.jsonl", (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:192])
    torchrun_in(copy, 2, run_args(tmp_path, data, **{"sharding.strategy": "none", "train.max_steps": 6,
                                                      "train.lr": 1e-2, "logging.sample_losses": "true"}))
    out = tests.communicate(timeout=300)[0]
    assert tests.returncode == 0, out[-3000:]
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.3, losses  # it trains
    assert (tmp_path / "run/checkpoints/step-6/manifest.json").exists()  # Muon's state is checkpointed
