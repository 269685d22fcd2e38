"""The one evaluator: fixed-size padded batches, correct counts per named rule, accuracies per split.

A method supplies a jitted *counts function* ``counts(*args, x, y, valid,
true_task, seen, *extra) -> {rule: correct count}`` (til, cil, the task-inference
rules, task_id, routing ...); ``accuracies`` runs it over every split and
divides. The counts functions shared by several methods (every sub-network of an
owner map at once; one network on one class block) live here too.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import parallel, routing
from modkd_jax.data import batching


def pad_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed-size batches ``(x, y, valid)`` over a split, the last one zero-padded (no recompiles)."""
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        pad = batch_size - len(yb)
        valid = np.arange(batch_size) < len(yb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
        yield xb, yb, valid


def batch_size_for(counts: Callable, batch_size: int, splits) -> int:
    """The evaluation batch: at most the largest split, a multiple of a data-parallel function's devices."""
    n = parallel.devices_of(counts)
    size = max(1, min(batch_size, max(len(s.y) for s in splits)))
    return -(-size // n) * n


def counts_per_split(counts: Callable, args: tuple, splits, seen: int, batch_size: int,
                     task_ids: Iterable[int] | None = None, extra: tuple = ()) -> list[tuple[dict, int]]:
    """``[(summed counts, examples)]`` per split; split ``i`` belongs to task ``task_ids[i]`` (default ``i``)."""
    task_ids = range(len(splits)) if task_ids is None else list(task_ids)
    batch_size = batch_size_for(counts, batch_size, splits)
    out = []
    for j, split in zip(task_ids, splits):
        total = None
        for x, y, valid in pad_batches(split.x, split.y, batch_size):
            c = counts(*args, x, y, valid, jnp.int32(j), jnp.int32(seen), *extra)
            total = c if total is None else jax.tree.map(jnp.add, total, c)
        out.append((jax.tree.map(np.asarray, total) if total is not None else None, len(split.y)))
    return out


def accuracies(counts: Callable, args: tuple, splits, seen: int, batch_size: int,
               task_ids: Iterable[int] | None = None, extra: tuple = ()) -> dict[str, np.ndarray]:
    """Accuracy of every rule ``counts`` returns on each split: ``{rule: array of len(splits)}`` (NaN if empty).

    Args:
      counts: the method's jitted counts function (see the module docstring).
      args: its leading arguments (variables, owner map ...).
      splits: the ``Split``s to evaluate.
      seen: the number of tasks learnt so far (class-incremental rules choose among them).
      batch_size: examples per call (padded; fewer for small splits).
      task_ids: the task of each split (default ``0, 1, ...``).
      extra: trailing arguments (the inference temperature ...).
    """
    per_split = counts_per_split(counts, args, splits, seen, batch_size, task_ids, extra)
    rules = next((tuple(c) for c, _ in per_split if c is not None), ())
    return {r: np.asarray([c[r] / n if n else np.nan for c, n in per_split], float) for r in rules}


def make_subnet_counts(apply_fn: Callable, task_count: int, block_size: int, mean, std) -> Callable:
    """``counts(params, batch_stats, owner, x, y, valid, true_task, seen, tau)`` of every sub-network, jitted.

    All ``task_count`` sub-networks run in one compiled call (``routing.subnet_logits``);
    the class-incremental rules choose among the first ``seen`` from ``softmax(z_j / tau)``.
    ``tau`` (the inference temperature) is traced, so choosing it compiles nothing new.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(params, batch_stats, owner, x, y, valid, true_task, seen, tau):
        xf = batching.to_float(x, mean, std)
        logits = routing.subnet_logits(apply_fn, params, batch_stats, owner, xf, task_count, block_size)
        probs = jax.nn.softmax(logits / tau, axis=-1)
        out = {rule: jnp.sum(valid & (task == true_task) & (cls == y))
               for rule, (task, cls) in routing.predictions(probs, true_task, seen).items()}
        out["task_id"] = jnp.sum(valid & (routing.max_prob_task(probs, seen) == true_task))
        return out

    return counts


def make_tau_counts(apply_fn: Callable, task_count: int, block_size: int, mean, std) -> Callable:
    """``counts(params, batch_stats, owner, x, y, valid, true_task, seen, taus) -> {"cil": (K,)}``, jitted.

    The max-probability rule's correct counts for every candidate inference
    temperature in ``taus`` (shape ``(K,)``), from one pass of the sub-networks.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(params, batch_stats, owner, x, y, valid, true_task, seen, taus):
        logits = routing.subnet_logits(apply_fn, params, batch_stats, owner, batching.to_float(x, mean, std),
                                       task_count, block_size)
        cls = jnp.argmax(logits, axis=-1)  # (T, B): a block's predicted class does not depend on tau

        def correct(tau):
            task = routing.max_prob_task(jax.nn.softmax(logits / tau, axis=-1), seen)
            return jnp.sum(valid & (task == true_task) & (cls[task, jnp.arange(len(y))] == y))

        return {"cil": jax.vmap(correct)(taus)}

    return counts


def choose_tau(tau_counts: Callable, args: tuple, splits, seen: int, batch_size: int,
               grid: Iterable[float]) -> tuple[float, dict[float, float]]:
    """The inference temperature of ``grid`` with the best max-probability CIL on ``splits`` (validation data).

    Returns ``(tau, {tau: accuracy})``. Ties (e.g. 2-class blocks, where the rule
    does not depend on tau) go to the tau closest to 1 on a log scale.
    """
    grid = tuple(float(t) for t in grid)
    per_split = counts_per_split(tau_counts, args, splits, seen, batch_size, extra=(jnp.asarray(grid, jnp.float32),))
    examples = sum(n for _, n in per_split)
    if examples == 0:
        raise ValueError("choosing the inference temperature needs validation examples")
    correct = np.sum([np.asarray(c["cil"]) for c, n in per_split if n], axis=0)
    acc = {tau: float(c) / examples for tau, c in zip(grid, correct)}
    best = max(acc.values())
    return min((t for t in grid if acc[t] == best), key=lambda t: abs(np.log(t))), acc


def make_block_counts(apply_fn: Callable, block_size: int, mean, std) -> Callable:
    """``counts(variables, x, y, valid, task, seen) -> {"til": count}`` of one network on one task's block, jitted."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(variables, x, y, valid, task, seen):
        logits = apply_fn(variables, batching.to_float(x, mean, std), task, train=False)
        z = jax.lax.dynamic_slice_in_dim(logits, task * block_size, block_size, axis=-1)
        return {"til": jnp.sum(valid & (jnp.argmax(z, -1) == y))}

    return counts


def block_accuracy(counts: Callable, variables, split, task: int, batch_size: int) -> float:
    """Accuracy of ``counts`` (``make_block_counts``) on one split of ``task``; NaN for an empty split."""
    if len(split.y) == 0:
        return float("nan")
    return float(accuracies(counts, (variables,), [split], task + 1, batch_size, [task])["til"][0])
