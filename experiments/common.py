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
    """--devices (data-parallel width) and --distributed (multi-host start, TPU pods / GPU clusters)."""
    parser.add_argument("--devices", type=int, default=0,
                        help="devices on the 'data' mesh axis (0: all visible; 1: no mesh)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (run the same command on every host)")


def mesh_from_args(args: argparse.Namespace):
    """The data-parallel mesh the flags ask for, or None for a single device (the plain jitted steps)."""
    from modkd_jax import parallel

    parallel.maybe_initialize_distributed(args.distributed)
    import jax

    n = jax.device_count() if args.devices == 0 else args.devices
    if n < 1 or n > jax.device_count():
        raise UsageError(f"--devices {args.devices}: {jax.device_count()} device(s) visible")
    return None if n == 1 else parallel.make_mesh(data=n)
