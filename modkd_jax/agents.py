"""The agents axis: learners stacked on a leading ``agents`` axis, placed on a mesh, stepped per agent and shifted
between agents (the only cross-agent traffic), plus the per-agent data around it; DKT and collective share it.

Every per-agent function runs ``vmap``-ed over the axis and jitted; with a mesh
the *same* function runs inside ``shard_map`` over the ``agents`` mesh axis,
with no communication. ``shift_agents`` moves data between agents:
``jnp.roll`` when vmapped, ``jax.lax.ppermute`` inside ``shard_map`` when
sharded (equal, tested).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modkd_jax import parallel
from modkd_jax.data.scenarios import Scenario, Split
from modkd_jax.data.sources import Dataset

PyTree = Any
AXIS = parallel.AXES[0]  # "agents"
TOPOLOGIES = ("ring", "gossip")  # ring: agent a learns from a+1; gossip: from a+s, s random per round


# ---------------------------------------------------------------------------- mesh and placement


def make_mesh(devices: int) -> Mesh | None:
    """``parallel.make_mesh`` with ``devices`` rows on ``agents`` (data axis 1); None for 1 (plain vmap)."""
    if devices <= 1:
        return None
    if devices > jax.device_count():
        raise ValueError(f"asked for {devices} devices, {jax.device_count()} available")
    return parallel.make_mesh(data=1, agents=devices)


def default_devices(agents: int) -> int:
    """All local devices when there are several and they divide the agents, else 1 (vmap on one device)."""
    n = jax.device_count()
    return n if n > 1 and agents % n == 0 else 1


def check_split(agents: int, devices: int) -> None:
    """A ValueError unless ``agents`` split evenly over ``devices`` (1 device: nothing to split).

    Args:
      agents: the number of agents.
      devices: the devices on the ``agents`` mesh axis.
    """
    if devices > 1 and agents % devices:
        raise ValueError(f"{agents} agents cannot be split evenly over {devices} devices")


def place(tree: PyTree, mesh: Mesh | None, shared: bool = False) -> PyTree:
    """Put ``tree`` on device: its leading axis split over the mesh's agents (or replicated if ``shared``).

    Args:
      tree: per-agent arrays ``[A, ...]`` (or shared ones, with ``shared``).
      mesh: the agents mesh (``make_mesh``); None: the default device.
      shared: replicate every leaf on each device instead of splitting it.
    """
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, P() if shared else P(AXIS)))


def on_agents(fn: Callable, mesh: Mesh | None, n_agent_args: int, n_shared: int = 1,
              donate: tuple[int, ...] = ()) -> Callable:
    """``fn(*per_agent_args, *shared_args)`` vmapped over the agents axis, jitted; with a mesh, inside shard_map.

    The body is the same in both cases: shard_map only hands each device its
    block of agents.

    Args:
      fn: one agent's function; it may not communicate across agents. Its outputs get an agents axis.
      mesh: the agents mesh (``make_mesh``); None: plain vmap on one device.
      n_agent_args: the leading arguments with an agents axis (mapped).
      n_shared: the trailing arguments every agent shares (not mapped; replicated).
      donate: positions of the arguments donated.
    """
    axes = (0,) * n_agent_args + (None,) * n_shared
    body = jax.vmap(fn, in_axes=axes)
    if mesh is not None:
        specs = tuple(P(AXIS) if a == 0 else P() for a in axes)
        body = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(AXIS))
    return jax.jit(body, donate_argnums=donate)


# ---------------------------------------------------------------------------- shifting between agents


def _roll(tree: PyTree, shift: int) -> PyTree:
    """``out[a] = tree[(a + shift) % A]`` along the leading axis."""
    return jax.tree.map(lambda x: jnp.roll(x, -shift, axis=0), tree)


def _ppermute_roll(x: jax.Array, shift: int, n_shards: int) -> jax.Array:
    """``_roll`` of one leaf from inside ``shard_map``: whole blocks by ppermute, the remainder by concat."""
    m = x.shape[0]  # agents per shard
    q, r = divmod(shift, m)

    def from_shard(k: int) -> jax.Array:  # shard d receives the block of shard d + k
        k %= n_shards
        if k == 0:
            return x
        return jax.lax.ppermute(x, AXIS, [((d + k) % n_shards, d) for d in range(n_shards)])

    first = from_shard(q)
    return first if r == 0 else jnp.concatenate([first[r:], from_shard(q + 1)[:r]], axis=0)


@functools.lru_cache(maxsize=None)
def _shifter(mesh: Mesh | None, shift: int) -> Callable:
    """The jitted exchange for one (mesh, shift); cached so each shift compiles once."""
    if mesh is None:
        return jax.jit(lambda tree: _roll(tree, shift))
    n = mesh.shape[AXIS]
    local = lambda tree: jax.tree.map(lambda x: _ppermute_roll(x, shift, n), tree)  # noqa: E731
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


def shift_agents(tree: PyTree, shift: int, mesh: Mesh | None) -> PyTree:
    """Agent ``a`` receives agent ``(a + shift) % A``'s slice of every leaf: the only cross-agent traffic.

    Args:
      tree: per-agent arrays ``[A, ...]``, placed as ``place`` does.
      shift: agent ``a`` takes agent ``a + shift``'s slice (modulo A; see ``round_shift``).
      mesh: the agents mesh; None: ``jnp.roll`` on one device.
    """
    agents = jax.tree.leaves(tree)[0].shape[0]
    return _shifter(mesh, int(shift) % agents)(tree)


def round_shift(topology: str, agents: int, seed: int, round_index: int) -> int:
    """Whose message each agent takes in a round: ring always ``a+1``; gossip ``a+s``, s in [1, A) drawn per round.

    Args:
      topology: ``"ring"`` or ``"gossip"`` (``TOPOLOGIES``).
      agents: the number of agents A (with 2, always 1).
      seed: the run's seed (gossip draws are reproducible).
      round_index: the round, mixed into the draw.
    """
    if topology == "ring" or agents == 2:
        return 1
    return int(np.random.default_rng([seed, 104729, round_index]).integers(1, agents))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every leaf of ``tree``."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------- per-agent data


def probe_holdout(ds: Dataset, n_probe: int, seed: int) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """``(ds without the probe rows, probe images, probe row indices)``: an unlabelled probe set from train.

    Args:
      ds: the dataset; the probe comes from its training rows.
      n_probe: the probe rows, at least 1 and fewer than half the training rows.
      seed: the seed of the draw.
    """
    if not 0 < n_probe < len(ds.train_y) // 2:
        raise ValueError(f"n_probe must be in [1, {len(ds.train_y) // 2}) for {ds.name}, got {n_probe}")
    idx = np.sort(np.random.default_rng([seed, 7919]).choice(len(ds.train_y), n_probe, replace=False))
    keep = np.setdiff1d(np.arange(len(ds.train_y)), idx, assume_unique=True)
    rest = dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
    return rest, ds.train_x[idx], idx


def class_mask(scenario: Scenario, tasks: int, num_classes: int) -> np.ndarray:
    """Boolean ``[num_classes]``: the classes of the scenario's first ``tasks`` tasks.

    Args:
      scenario: the scenario, its tasks' ``classes`` global class ids.
      tasks: how many of its tasks, from the first.
      num_classes: the mask's length (every class of the dataset).
    """
    mask = np.zeros(num_classes, bool)
    for task in scenario.tasks[:tasks]:
        mask[task.classes] = True
    return mask


def stack_splits(splits: list[Split | None], n_max: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [A, n_max, ...], y_global [A, n_max], n [A])``: one split per agent, zero-padded to one shape.

    Args:
      splits: one ``Split`` per agent (uint8 images), at least one not None; an agent without a split (None)
        gets zero rows (``n = 0``).
      n_max: the padded length (None: the largest split); a fixed one for a whole run keeps one compiled step
        for every experience.
    """
    n = np.array([0 if s is None else len(s) for s in splits], np.int64)
    n_max = int(n.max()) if n_max is None else n_max
    shape = next(s.x.shape[1:] for s in splits if s is not None)
    x = np.zeros((len(splits), n_max, *shape), np.uint8)
    y = np.zeros((len(splits), n_max), np.int32)
    for a, s in enumerate(splits):
        if s is not None:
            x[a, : n[a]], y[a, : n[a]] = s.x, s.y_global
    return x, y, n


def stack_learners(init: Callable[[jax.Array], tuple[PyTree, PyTree]], keys: list[jax.Array], tx) -> PyTree:
    """Fresh learners (params, batch stats, optimizer state of ``tx``), one per key, stacked on the agents axis.

    Args:
      init: ``init(key) -> (params, batch_stats)`` initialises one learner.
      keys: one PRNG key per agent.
      tx: the optimizer whose state each learner gets.

    Returns:
      ``{"params", "batch_stats", "opt"}``, each leaf ``[A, ...]``; params and batch stats on the host
      (``place`` them).
    """
    per = [init(k) for k in keys]
    params = jax.tree.map(lambda *a: np.stack(a), *[p for p, _ in per])
    bs = jax.tree.map(lambda *a: np.stack(a), *[b for _, b in per])
    return {"params": params, "batch_stats": bs, "opt": jax.vmap(tx.init)(params)}
