"""The README's quickstart as a user runs it (torchrun, 2 ranks, FSDP2, its config and data), trained for 120 of its
313 steps (the schedule compressed to fit) to keep the suite short: the export must pass held-out exact match >= 90%
on chats whose (start, end) pairs never occur in training. (The whole quickstart reaches 100%; README.)"""

import json

from conftest import QS_CONFIG, torchrun


def test_quickstart_learns(tmp_path):
    p = torchrun(2, ["--config", QS_CONFIG, f"--train.output_dir={tmp_path}/run", f"--data.cache_dir={tmp_path}/cache",
                     "--train.max_steps=120", "--train.eval_every_steps=60"], timeout=900)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["heldout_exact_match"] >= 0.9, summary
    assert summary["final_loss"] < 0.05
    assert summary["best_eval_loss"] < 0.2
    assert "held-out exact match:" in p.stdout
