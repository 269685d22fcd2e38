"""Shared test set-up: a persistent XLA compilation cache and the offline data folder."""

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Persistent XLA cache outside the checkout, so fresh clones on the same machine (CI) reuse it; exported
# through JAX's own variables too, so the tests' subprocesses (8-device checks, CLI runs) share it. Every
# program is kept, however quick its compile: the suite compiles thousands of small ones, and loading them
# takes 13 % less time than compiling (diagnostics.backend_compiles counts a load as JAX does: as a compile).
_CACHE = os.environ.get("MODKD_JAX_CACHE", str(Path.home() / ".cache" / "modkd_jax" / "xla"))
_SETTINGS = {"jax_compilation_cache_dir": _CACHE, "jax_persistent_cache_min_compile_time_secs": 0}
for _name, _value in _SETTINGS.items():
    os.environ[_name.upper()] = str(_value)
    jax.config.update(_name, _value)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repo (official MNIST / Fashion-MNIST archives)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"offline archives not found at {SHARED_DATA}")
    return SHARED_DATA
