"""Shared test set-up: a persistent XLA compilation cache and the offline data folder."""

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Persistent XLA cache outside the checkout, so fresh clones on the same machine (CI) reuse it; exported
# through JAX's own variables too, so the tests' subprocesses (8-device checks, CLI runs) share it.
_CACHE = os.environ.get("MODKD_JAX_CACHE", str(Path.home() / ".cache" / "modkd_jax" / "xla"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repo (official MNIST / Fashion-MNIST archives)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"offline archives not found at {SHARED_DATA}")
    return SHARED_DATA
