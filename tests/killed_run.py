"""``python -m experiments.mind`` that SIGKILLs itself right after its first checkpoint is saved (run by
tests/test_conformance.py): an abrupt death between tasks at a fixed point, whatever the machine's speed.

Usage: ``python tests/killed_run.py [CLI flags ...]``.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import mind as cli  # noqa: E402
from modkd_jax import checkpoint  # noqa: E402

_save = checkpoint.save


def save_then_die(mngr, step, *args, **kwargs):
    """The real save (synchronous: the step is on disk when it returns), then no clean shutdown at all."""
    _save(mngr, step, *args, **kwargs)
    if step == 1:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save = save_then_die

if __name__ == "__main__":
    raise SystemExit(cli.main(sys.argv[1:]))
