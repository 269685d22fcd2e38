"""Orbax checkpoints: one step per finished task, resume, and export of one frozen sub-network.

A run's checkpoints live in ``<workdir>/checkpoints``; step ``i + 1`` holds the
state after task ``i`` (``state`` pytree) and a JSON ``meta`` item. Saves are
synchronous (``wait_until_finished``), so a step on disk is always complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from modkd_jax import masks

PyTree = Any


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (corrupt, truncated or from another run)."""


def manager(workdir: str | os.PathLike) -> ocp.CheckpointManager:
    """A manager keeping every task's step under ``<workdir>/checkpoints``."""
    directory = Path(workdir).resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree, meta: dict) -> None:
    """Write ``state`` and ``meta`` as ``step`` and wait until it is on disk."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def latest(mngr: ocp.CheckpointManager, like: PyTree) -> tuple[int, PyTree, dict] | None:
    """``(step, state, meta)`` of the newest step, restored into the structure of ``like``; None if none."""
    step = mngr.latest_step()
    if step is None:
        return None
    try:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as exc:  # orbax raises many types for damaged files
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} is unreadable ({type(exc).__name__}); "
            "delete that step folder to resume from the one before, or use a fresh --workdir"
        ) from exc
    return step, restored["state"], restored["meta"]


def export_subnetwork(path: str | os.PathLike, params: PyTree, batch_stats: PyTree, owner: PyTree,
                      task: int, spec: dict) -> None:
    """Save task ``task``'s frozen sub-network on its own: its gated weights, masks and batch norm.

    ``spec`` (JSON) must say how to rebuild the model (e.g. arch, num_outputs,
    num_tasks, block_size); it is stored beside the arrays.
    """
    path = Path(path).resolve()
    mask = masks.forward_mask(owner, task)
    item = {"params": masks.gate(params, mask), "batch_stats": batch_stats, "mask": mask}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "arrays", item, force=True)
        ckptr.wait_until_finished()
    (path / "spec.json").write_text(json.dumps({**spec, "task": int(task)}, indent=2))


def load_subnetwork(path: str | os.PathLike) -> tuple[dict, PyTree]:
    """``(spec, {"params", "batch_stats", "mask"})`` of a sub-network saved by ``export_subnetwork``."""
    path = Path(path).resolve()
    try:
        spec = json.loads((path / "spec.json").read_text())
        with ocp.StandardCheckpointer() as ckptr:
            item = ckptr.restore(path / "arrays")
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable exported sub-network ({type(exc).__name__})") from exc
    return spec, item


def key_to_array(key: jax.Array) -> np.ndarray:
    """A typed PRNG key as plain uint32 data (checkpointable)."""
    return np.asarray(jax.random.key_data(key))


def array_to_key(data) -> jax.Array:
    """The inverse of ``key_to_array``."""
    return jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32))
