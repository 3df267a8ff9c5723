"""train.py with a fault injected, for the checkpoint tests; run it where train.py would run:

    FAULT=module.function:N:action [FAULT_RANK=r] python tests/faults.py --config ...   (or under torchrun)

Before the N-th call of `module.function` (e.g. `sharding.clip_and_step`, `torch.save`) on rank FAULT_RANK (every
rank if unset), `action` happens: `kill` SIGKILLs this process (kill -9); `term-parent` sends SIGTERM to the
parent, torchrun, which forwards it to every rank as it does when a scheduler stops a job; `usr1` sends SIGUSR1
to this process only.
"""

import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

target, n, action = os.environ["FAULT"].split(":")
module_name, name = target.rsplit(".", 1)
module = importlib.import_module(module_name)
original, calls = getattr(module, name), 0
pid = {"kill": os.getpid, "term-parent": os.getppid, "usr1": os.getpid}[action]()
sig = {"kill": signal.SIGKILL, "term-parent": signal.SIGTERM, "usr1": signal.SIGUSR1}[action]


def faulty(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(n) and os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        os.kill(pid, sig)
    return original(*args, **kwargs)


setattr(module, name, faulty)
import train  # noqa: E402

train.main(sys.argv[1:])
