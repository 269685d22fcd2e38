"""What every experiment CLI shares: data flags, clean failure on bad input, progress settings."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from modkd_jax.checkpoint import CheckpointError
from modkd_jax.data import DATASETS, DataUnavailableError
from modkd_jax.rundir import RunDirError

# Errors that mean "bad input", reported as one line and exit code 2.
USER_ERRORS = (DataUnavailableError, RunDirError, CheckpointError)


class UsageError(ValueError):
    """A flag combination that cannot run; reported as one line, exit code 2."""


def add_data_flags(parser: argparse.ArgumentParser, default_dataset: str) -> None:
    """--dataset, --data_dir, --tfds_dir, --seed."""
    parser.add_argument("--dataset", default=default_dataset, choices=DATASETS)
    parser.add_argument("--data_dir", default=None,
                        help="folder with the official archives (TFDS manual_dir), e.g. ../shared/data/mnist; "
                             "env MODKD_DATA_DIR")
    parser.add_argument("--tfds_dir", default=None, help="where TFDS keeps prepared data (env MODKD_TFDS_DIR)")
    parser.add_argument("--seed", type=int, default=0)


def show_progress() -> bool:
    """Progress bars on an interactive terminal, quiet in CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main``; bad input ends with one line on stderr and exit code 2, not a traceback."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS + (UsageError,) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; re-run the same command to resume after the last finished task", file=sys.stderr)
            return 130

    return wrapper


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """--devices (data-parallel width), --distributed and the multi-process start-up settings."""
    parser.add_argument("--devices", type=int, default=0,
                        help="devices on the 'data' mesh axis (0: all visible; 1: no mesh)")
    parser.add_argument("--distributed", action="store_true",
                        help="start JAX's multi-process runtime first (run the same command on every host; on "
                             "Cloud TPU and SLURM it finds its peers itself)")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 (implies --distributed; env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="number of processes (implies --distributed; env JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=None,
                        help="this process's id, 0..num_processes-1 (implies --distributed; env JAX_PROCESS_ID)")


def mesh_from_args(args: argparse.Namespace):
    """The data-parallel mesh the flags ask for, or None for a single device (the plain jitted steps)."""
    from modkd_jax import parallel

    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    try:
        parallel.maybe_initialize_distributed(args.distributed or any(v is not None for v in explicit),
                                              *explicit)
    except (ValueError, RuntimeError) as exc:  # jax reports bad or missing settings as either
        raise UsageError(f"multi-process start failed: {' '.join(str(exc).split())}") from exc
    import jax

    n = jax.device_count() if args.devices == 0 else args.devices
    if n < 1 or n > jax.device_count():
        raise UsageError(f"--devices {args.devices}: {jax.device_count()} device(s) visible")
    return None if n == 1 else parallel.make_mesh(data=n)
