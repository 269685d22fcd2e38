"""The host-fed epoch runner: one step applied to each batch the host draws, metrics summed on the device.

``training.run_phase`` trains on a split placed on the device (batches gathered inside the compiled call).
Training whose batches the host draws (DKT's and the collective's agents-axis steps, the collective's
central model, the split backbone's stream) runs through ``run_epoch``: one loop, one place where the
metrics are summed (on the device, no fetch per step) and fetched (once, at the end of the epoch).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from modkd_jax import parallel

PyTree = Any


@jax.jit
def _add(sums: PyTree, metrics: PyTree) -> PyTree:
    """Running metric sums plus one step's metrics (one dispatch per step, on the device)."""
    return jax.tree.map(jnp.add, sums, metrics)


def run_epoch(step: Callable, carry: PyTree, batches: Iterable[tuple], *, metrics: bool = True, desc: str = "",
              progress: bool = False, total: int | None = None) -> tuple[PyTree, dict[str, np.ndarray], int]:
    """``step(carry, *batch) -> (carry, metrics)`` applied to each batch in turn.

    Args:
      step: the (compiled) training step; its metrics are a dict of arrays (any shape, e.g. ``[A]`` per agent).
      carry: the state threaded through the steps (parameters, optimizer state ...).
      batches: the epoch's step arguments after the carry, one tuple per step, drawn lazily.
      metrics: sum and fetch the steps' metrics; False for a caller that discards them (no per-step add, no
        fetch: the epoch stays queued on the device).
      desc: the progress bar's label.
      progress: show a progress bar.
      total: the number of batches, for the progress bar.

    Returns:
      ``(carry, means, steps)``: the final carry, each metric's mean over the steps (every step weighted
      alike) as a float64 host array, fetched once (``parallel.to_host``: every process of a multi-process run
      calls it), and the number of steps; ``means`` is empty when there was no step or ``metrics`` is False.
    """
    sums, steps = None, 0
    for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
        carry, m = step(carry, *batch)
        if metrics:
            sums = m if sums is None else _add(sums, m)
        steps += 1
    means = {k: parallel.to_host(v).astype(np.float64) / steps for k, v in sums.items()} if sums is not None else {}
    return carry, means, steps
