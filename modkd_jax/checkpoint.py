"""Orbax checkpoints: one step per finished task, resume, and export of one frozen sub-network.

A run's checkpoints live in ``<workdir>/checkpoints``; step ``i + 1`` holds the
state after task ``i`` (``state`` pytree) and a JSON ``meta`` item. Saves are
synchronous (``wait_until_finished``), so a step on disk is always complete.

Several processes (multi-host): every process calls ``save`` and ``latest`` for
the same step with the learner's ``mesh``. Orbax writes only global
``jax.Array``s there, so ``global_tree`` replicates every leaf that one process
holds by itself (host arrays, arrays on one local device) over the mesh first;
``latest`` restores into that replicated layout and hands each leaf back in the
layout the fresh state had (``local_like``), and every process resumes from
process 0's newest step (``agreed_step``). With one process the tree is saved
and restored exactly as before (no mesh needed).
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


def _multi(mesh) -> bool:
    """Whether saves need global arrays: several processes and a mesh to place the state on."""
    return mesh is not None and jax.process_count() > 1


def _is_global(x) -> bool:
    """A ``jax.Array`` that spans devices of other processes (already a global array)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def global_tree(mesh, tree: PyTree) -> PyTree:
    """``tree`` with every leaf a global ``jax.Array`` on ``mesh`` (what multi-host orbax saves).

    A copy for the save: the caller's tree is unchanged.

    Args:
      mesh: the learner's mesh, to replicate process-local leaves over.
      tree: the state; global arrays stay as they are, every other leaf (numpy, Python numbers, an array on
        one local device) holds the same value in every process (same seed, same computation) and is replicated.
    """
    from modkd_jax import parallel

    return jax.tree.map(lambda x: x if _is_global(x) else parallel.replicate(mesh, x), tree)


def local_like(restored: PyTree, like: PyTree) -> PyTree:
    """Each restored leaf in the layout of the matching leaf of ``like`` (the fresh state).

    The resumed state mixes with the mesh's arrays as a fresh run's state does.

    Args:
      restored: the state as restored (global arrays replicated over the mesh).
      like: the fresh state: its global arrays keep their restored (same) sharding; host leaves come back as
        numpy; arrays committed to this process's devices go back to them, uncommitted ones stay uncommitted.
    """
    def back(r, x):
        if _is_global(x):
            return r
        host = np.asarray(r.addressable_data(0) if isinstance(r, jax.Array) else r)
        if isinstance(x, jax.Array):  # an uncommitted array stays uncommitted: jit may move it to the mesh
            return jax.device_put(host, x.sharding) if x.committed else jnp.asarray(host, x.dtype)
        if isinstance(x, np.ndarray):
            return host.astype(x.dtype, copy=False)
        return type(x)(host) if isinstance(x, (int, float, bool)) else host

    return jax.tree.map(back, restored, like)


def agreed_step(step: int | None) -> int | None:
    """Process 0's ``step`` in every process (all resume from the same step); ``step`` with one process."""
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils

    agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if agreed < 0 else agreed


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree, meta: dict, mesh=None) -> None:
    """Write ``state`` and ``meta`` as ``step`` and wait until it is on disk.

    With several processes every process calls it with the same ``step``.

    Args:
      mngr: the run's manager (``manager``).
      step: the step number (``i + 1`` after task ``i``).
      state: the pytree to save (arrays, keys as ``key_to_array``).
      meta: JSON-ready values saved beside it.
      mesh: the learner's mesh; with several processes the state is saved as global arrays on it
        (``global_tree``). None: one process.
    """
    if _multi(mesh):
        state = global_tree(mesh, state)
    elif jax.process_count() > 1 and not all(_is_global(x) for x in jax.tree.leaves(state)):
        raise ValueError("a multi-process checkpoint needs the learner's mesh (Learner.mesh) to place "
                         "process-local state leaves on")
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def latest(mngr: ocp.CheckpointManager, like: PyTree, mesh=None) -> tuple[int, PyTree, dict] | None:
    """``(step, state, meta)`` of the newest step, restored into the structure of ``like``; None if none.

    Args:
      mngr: the run's manager (``manager``).
      like: a fresh state of the same structure, shapes and dtypes.
      mesh: the learner's mesh; with several processes every process restores process 0's newest step
        (``agreed_step``) into the replicated layout and gets each leaf back in ``like``'s layout (``local_like``).

    Raises:
      CheckpointError: the newest step cannot be read.
    """
    step = agreed_step(mngr.latest_step())
    if step is None:
        return None
    try:
        if _multi(mesh):
            from modkd_jax import parallel

            rep = parallel.replicated(mesh)
            abstract = jax.tree.map(lambda x: ocp.utils.to_shape_dtype_struct(x) if _is_global(x) else
                                    jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype,
                                                         sharding=rep), like)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as exc:  # orbax raises many types for damaged files
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} is unreadable ({type(exc).__name__}); "
            "delete that step folder to resume from the one before, or use a fresh --workdir"
        ) from exc
    state = local_like(restored["state"], like) if _multi(mesh) else restored["state"]
    return step, state, restored["meta"]


def export_subnetwork(path: str | os.PathLike, params: PyTree, batch_stats: PyTree, owner: PyTree,
                      task: int, spec: dict, inference: PyTree | None = None) -> None:
    """Save task ``task``'s frozen sub-network on its own: its gated weights, masks and batch norm.

    Args:
      path: the folder to write (``arrays`` and ``spec.json``; an existing one is overwritten).
      params: the whole network's parameters.
      batch_stats: its batch statistics (saved whole: per-task rows included).
      owner: the owner maps; the sub-network computes with the weights of tasks <= ``task``.
      task: the sub-network to export.
      spec: JSON values that say how to rebuild the model (e.g. arch, num_outputs, num_tasks, block_size),
        stored beside the arrays with ``task``.
      inference: a state's task-inference statistics (``task_inference.init_stats``): the task's own row of
        every statistic is saved too, so the exported sub-network can still claim its inputs among others.
    """
    path = Path(path).resolve()
    mask = masks.forward_mask(owner, task)
    item = {"params": masks.gate(params, mask), "batch_stats": batch_stats, "mask": mask}
    if inference is not None:
        item["inference"] = {rule: jax.tree.map(lambda v: v[task], stats) for rule, stats in inference.items()
                             if rule != "rule"}
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
