"""train.py with a fault injected, for the checkpoint tests; run it where train.py would run:

    FAULT=module.function:N:action [FAULT_RANK=r] python tests/faults.py --config ...   (or under torchrun)

Before the N-th call of `module.function` (e.g. `sharding.clip_and_step`, `torch.save`) on rank FAULT_RANK (every
rank if unset), `action` happens: `kill` SIGKILLs this process (kill -9); `term-parent` sends SIGTERM to the
parent, torchrun, which forwards it to every rank as it does when a scheduler stops a job; `usr1` sends SIGUSR1
to this process only; `sleepS` sleeps S seconds first (a stalled rank); `enospc` raises OSError(ENOSPC) instead
of the call (a full disk).
"""

import errno
import importlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

target, n, action = os.environ["FAULT"].split(":")
module_name, name = target.rsplit(".", 1)
module = importlib.import_module(module_name)
original, calls = getattr(module, name), 0


def fault():
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    if action.startswith("sleep"):
        print(f"FAULT: rank {os.environ.get('RANK', '0')} sleeps {action[5:]} s at {time.time():.1f}", flush=True)
        time.sleep(float(action[5:]))
        return
    pid = {"kill": os.getpid, "term-parent": os.getppid, "usr1": os.getpid}[action]()
    os.kill(pid, {"kill": signal.SIGKILL, "term-parent": signal.SIGTERM, "usr1": signal.SIGUSR1}[action])


def faulty(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(n) and os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        fault()
    return original(*args, **kwargs)


setattr(module, name, faulty)
import train  # noqa: E402

train.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as train.py ends
