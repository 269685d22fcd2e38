"""One process of a checkpointed MIND run through the CLI's own parser and start-up (run by tests/test_distributed.py).

Usage: ``python tests/multihost_run.py WORKDIR DEVICES [STOP_AFTER|-] [STUCK_AT|-] [CLI flags ...]``.

``DEVICES`` CPU devices are forced in this process before JAX starts
(``--xla_force_host_platform_device_count``); the CLI flags (e.g.
``--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id 1``)
start the multi-process runtime exactly as ``python -m experiments.mind`` does.
``STOP_AFTER`` ends the run cleanly after that many finished tasks (to test
resuming); ``STUCK_AT`` makes this process, on reaching that task, write
``WORKDIR.stuck`` and wait forever (the test then SIGKILLs it mid-run). The
run's configuration is fixed here: MIND on digits, 2 tasks, tiny MLP, 1 epoch, the rule chosen by ``auto`` (every
candidate's statistics fitted on data split across the processes).
"""

import os
import sys
import time
from pathlib import Path

workdir, devices, stop_after, stuck_at, *flags = sys.argv[1:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments import mind as cli  # noqa: E402

ARGV = ["--dataset", "digits", "--task_count", "2", "--arch", "mlp", "--hidden", "32", "32", "--epochs", "1",
        "--distill_epochs", "1", "--batch_size", "32", "--no_augment", "--optimizer", "sgd", "--lr", "0.05",
        "--distill_lr", "0.05", "--temperature", "2", "--task_inference", "auto", "--workdir", workdir]


@common.guarded
def main(argv) -> int:
    args = cli.parser().parse_args(argv)
    mesh = common.mesh_from_args(args)
    if stuck_at != "-":
        from modkd_jax.methods import mind

        real = mind.learn_task

        def learn_task(m, state, t, key, **kw):  # this process stops answering its peers at task STUCK_AT
            if t == int(stuck_at):
                Path(workdir + ".stuck").write_text(str(t))
                while True:
                    time.sleep(1)
            return real(m, state, t, key, **kw)

        mind.learn_task = learn_task
    cli.run(cli.resolve_config(args), args.workdir, stop_after=None if stop_after == "-" else int(stop_after),
            mesh=mesh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGV + flags))
