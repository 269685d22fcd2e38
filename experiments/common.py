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
