"""Timing helpers shared by the benchmarks: device banner, interleaved timing, FLOPs, memory, matmul rate.

Benchmarks compare contenders *in one run*: every contender is warmed up
(compiled) first, then the contenders are timed round-robin for a few rounds
and each one's median is reported, so a busy shared machine slows all of them
alike and the printed ratios stay meaningful where absolute figures drift.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def free_port() -> int:
    """A free TCP port on localhost (a multi-process run's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner() -> str:
    """One line naming the JAX version, backend, devices and host CPU count."""
    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return (f"jax {jax.__version__} | backend {jax.default_backend()} | {len(devs)} device(s): {', '.join(kinds)} | "
            f"host {platform.machine()} with {os.cpu_count()} CPU(s), {load()}")


def load() -> str:
    """The host's 1-minute load average against its CPU count (timings on a busy host drift)."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)"
    except OSError:
        return "load average unknown"


def block(x: Any) -> Any:
    """Wait for every array in ``x`` (JAX arrays; anything else passes through)."""
    return jax.block_until_ready(x)


def time_once(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, waiting for its results."""
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def interleaved(contenders: dict[str, Callable[[], Any]], rounds: int, calls: int = 1,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, timed round-robin (``rounds`` x ``calls`` calls each)."""
    for fn in contenders.values():
        for _ in range(warmup):
            block(fn())
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(s)) for name, s in samples.items()}


def cost_flops(jitted, *args, **kwargs) -> float | None:
    """FLOPs of one call of ``jitted`` from XLA's cost analysis of the compiled program (None where absent)."""
    try:
        analysis = jitted.lower(*args, **kwargs).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost model
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def executable_memory(executable) -> int | None:
    """Bytes a compiled executable plans for one call (arguments + outputs + temporaries - aliased)."""
    m = executable.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def compiled_memory(jitted, *args, **kwargs) -> int | None:
    """Bytes XLA plans for one call (arguments + outputs + temporaries - aliased), from ``memory_analysis()``."""
    try:
        return executable_memory(jitted.lower(*args, **kwargs).compile())
    except Exception:  # noqa: BLE001
        return None


def compile_stats(jitted, *args, **kwargs) -> tuple[float, int | None]:
    """(seconds to lower and compile ``jitted`` for these arguments, ``compiled_memory`` of the result)."""
    start = time.perf_counter()
    executable = jitted.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - start
    try:
        return seconds, executable_memory(executable)
    except Exception:  # noqa: BLE001 - backends without a memory model
        return seconds, None


def device_peak_memory() -> int | None:
    """Peak bytes in use on device 0 since start, where the backend reports it (GPU/TPU; None on CPU)."""
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def matmul_rate(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured GFLOP/s of an ``n x n`` matmul (best of ``repeats``); bf16 operands accumulate in float32."""
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    block(mm(a, b))
    best = min(time_once(lambda: mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def fmt_bytes(n: int | None) -> str:
    """Human-readable bytes ("-" for unknown)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width text table of ``rows`` (dicts) in ``columns`` order."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])


def publish(lines: list[str], path) -> str:
    """The report ``lines`` printed and written to ``path`` (a results file); returns the text."""
    text = "\n".join(lines)
    print(text)
    path.write_text(text)
    return text
