"""DKT's data: each learner's class order and scenario, the joint teacher's split, and what every epoch feeds the
per-agent step (batch and probe indices, host RNGs, augmentation keys, the experience on the agents axis)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh

from modkd_jax.agents import place, stack_splits
from modkd_jax.data.scenarios import Scenario, Split, class_split
from modkd_jax.data.sources import Dataset

if TYPE_CHECKING:
    from modkd_jax.methods.dkt import World


def order_seed(seed: int, agent: int) -> int:
    """The class-order seed of ``agent`` (agent 0 of seed s has ``class_split``'s order for 1000*s)."""
    return 1000 * seed + agent


def agent_scenarios(ds: Dataset, task_count: int, agents: int, seed: int, val_fraction: float = 0.0
                    ) -> list[Scenario]:
    """One class-incremental scenario of ``ds`` per agent, each with its own class order."""
    return [class_split(ds, task_count, seed=order_seed(seed, a), val_fraction=val_fraction) for a in range(agents)]


def joint_split(scenario: Scenario) -> Split:
    """All training data of a scenario as one split (global labels), for the joint teacher."""
    parts = [t.train for t in scenario.tasks]
    yg = np.concatenate([p.y_global for p in parts])
    return Split(np.concatenate([p.x for p in parts]), yg, yg)


def epoch_indices(n: np.ndarray, batch_size: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """``[A, S, B]`` example indices of one epoch; ``S = min(n) // B`` so every agent takes the same steps.

    Each agent draws a fresh permutation of its own examples; an agent with more
    examples than ``S * B`` uses a different random subset each epoch.
    """
    steps = int(n.min()) // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {int(n.min())} examples of an experience")
    return np.stack([rng.permutation(int(k))[: steps * batch_size].reshape(steps, batch_size)
                     for k, rng in zip(n, rngs)]).astype(np.int32)


def learner_key(world: World, role: int, agent: int) -> jax.Array:
    """Init key of learner ``agent`` (role 0: agents/student, 1: teacher); independent of the agent count."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(world.seed), role), agent)


def epoch_inputs(world: World, data: dict, lam: float, rngs, keys, mesh: Mesh | None) -> tuple[dict, dict, int]:
    """``(per-agent step inputs, shared step inputs, steps)`` of one epoch: batch and probe indices, keys.

    The index arrays are padded to the steps of the longest experience: one compiled step per run.
    """
    idx = epoch_indices(data["n"], world.cfg.batch_size, rngs)
    steps = idx.shape[1]
    pidx = np.stack([rng.integers(0, len(world.probe_x), (steps, world.cfg.probe_batch_size)) for rng in rngs])
    pad = ((0, 0), (0, data["x"].shape[1] // world.cfg.batch_size - steps), (0, 0))
    per_agent = {"x": data["x"], "y": data["y"], "seen": data["seen"],
                 **place({"idx": np.pad(idx, pad), "pidx": np.pad(pidx.astype(np.int32), pad), "key": keys}, mesh)}
    shared = {"probe_x": world.probe_x, **place({"lam": np.float32(lam)}, mesh, shared=True),
              "s": np.int32(0)}  # the step index: train_epoch passes each step's
    return per_agent, shared, steps


def epoch_rngs(world: World, role: int, agents: int, t: int, epoch: int) -> list[np.random.Generator]:
    """Host RNG of each agent's batches in one epoch: depends on (seed, role, agent, t, epoch) only."""
    return [np.random.default_rng([world.seed, role, a, t, epoch]) for a in range(agents)]


def epoch_keys(world: World, role: int, agents: int, t: int, epoch: int) -> np.ndarray:
    """Augmentation key data ``[A, 2]`` of each agent for one epoch."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(
        jax.random.fold_in(learner_key(world, role, a), t), 1000 + epoch))) for a in range(agents)])


def experience_data(world: World, splits: list[Split], seen: np.ndarray, mesh: Mesh | None) -> dict:
    """One experience's training data of every agent on device (agents axis), with their seen masks."""
    longest = max(len(task.train) for scen in world.scenarios for task in scen.tasks)
    x, y, n = stack_splits(splits, max(longest, max(len(s) for s in splits)))
    return {**place({"x": x, "y": y, "seen": seen}, mesh), "n": n}
