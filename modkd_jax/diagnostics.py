"""Process-wide counters that show whether the hot paths stay compiled: backend compiles so far.

``backend_compiles()`` counts XLA backend compilations in this process (every jitted program, eager op or
shape change that reaches the compiler); the loop records the count per task, so a run whose later tasks
compile nothing shows zeros there. JAX times a program loaded from its persistent compilation cache as a
backend compile too, so a warm cache counts the same (and cannot hide a shape that changes per task).
"""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_registered = False


def _on_event(event: str, duration: float, **_) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def backend_compiles() -> int:
    """XLA backend compilations in this process since the counter was first read (it starts on first use)."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _registered = True
        return _count
