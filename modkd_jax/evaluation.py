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

from modkd_jax import masks, parallel, routing, task_inference
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
    """The evaluation batch: at most the largest split (anything with a length), a multiple of a data-parallel
    function's devices."""
    n = parallel.devices_of(counts)
    size = max(1, min(batch_size, max(len(s) for s in splits)))
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
        out.append((jax.tree.map(parallel.to_host, total) if total is not None else None, len(split.y)))
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


def make_subnet_counts(apply_fn: Callable, task_count: int, block_size: int, mean, std, kinds,
                       rules: tuple[str, ...] = task_inference.SUBNET_RULES) -> Callable:
    """``counts(params, batch_stats, owner, inference, x, y, valid, true_task, seen, tau)``, jitted.

    All ``task_count`` sub-networks run in one compiled call (``routing.subnet_outputs``);
    every task-inference rule of ``rules`` chooses among the first ``seen`` (``task_inference.infer``)
    and the class is the chosen sub-network's. ``inference`` holds the fitted statistics and the
    rule in use (``task_inference.init_stats``); ``tau`` (the inference temperature) is traced,
    so choosing it compiles nothing new. Returns ``til`` and ``task_inference.rule_counts``.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(params, batch_stats, owner, inference, x, y, valid, true_task, seen, tau):
        xf = batching.to_float(x, mean, std)
        logits, features = routing.subnet_outputs(apply_fn, params, batch_stats, owner, xf, task_count, block_size)
        grad = None
        if "entropy_grad" in rules:
            grad = task_inference.entropy_gradient(apply_fn, params, batch_stats, owner, kinds, xf, seen,
                                                   task_count, block_size)
        tasks = task_inference.infer(rules, logits, seen, tau=tau, x=task_inference.pixels(x), stats=inference,
                                     features=features, grad=grad)
        cls = jnp.argmax(logits, axis=-1)  # (T, B): every sub-network's class
        out = {"til": jnp.sum(valid & (cls[true_task] == y))}
        out.update(task_inference.rule_counts(tasks, cls, y, valid, true_task, inference["rule"]))
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


def make_subnet_features(apply_fn: Callable, mean, std) -> Callable:
    """``features(params, batch_stats, owner, x, task) -> (B, h)``: sub-network ``task``'s features, jitted."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def features(params, batch_stats, owner, x, task):
        gated = masks.gate(params, masks.forward_mask(owner, task))
        return apply_fn({"params": gated, "batch_stats": batch_stats}, batching.to_float(x, mean, std), task,
                        train=False, with_features=True)[1]

    return features


def features_of(features: Callable, args: tuple, x: np.ndarray, task: int, batch_size: int) -> np.ndarray:
    """``features(*args, batch, task)`` of every image of ``x``, in order: ``(n, h)``."""
    batch_size = batch_size_for(features, batch_size, [x])
    rows = [np.asarray(features(*args, xb, jnp.int32(task)))[valid]
            for xb, _, valid in pad_batches(x, np.zeros(len(x), np.int32), batch_size)]
    return np.concatenate(rows)


def choose_rule(cfg: task_inference.InferenceConfig, rules: tuple[str, ...], counts: Callable, args: tuple, splits,
                seen: int, batch_size: int, extra: tuple = ()) -> tuple[int, dict]:
    """The task-inference rule in use after ``seen`` tasks: ``(index into rules, info)``.

    A fixed rule is used as configured; ``auto`` takes the rule with the best task identification
    (``task_id_<rule>`` of ``counts``) on ``splits``, the seen tasks' validation splits (never a test split).
    """
    if cfg.task_inference != "auto":
        return rules.index(cfg.task_inference), {"rule": cfg.task_inference}
    per_split = counts_per_split(counts, args, splits, seen, batch_size, extra=extra)
    examples = sum(n for _, n in per_split)
    if examples == 0:
        raise ValueError("choosing the task-inference rule needs validation examples")
    val = {r: float(sum(c[f"task_id_{r}"] for c, n in per_split if n)) / examples for r in rules}
    rule = task_inference.choose(val, rules)
    return rules.index(rule), {"rule": rule, "val_task_id": val}


def update_subnet_inference(cfg: task_inference.InferenceConfig, inference, scenario, t: int, features: Callable,
                            counts: Callable, args: tuple, batch_size: int, key: jax.Array, extra: tuple = ()):
    """``(inference, info)`` after task ``t`` of a sub-network method: t's statistics fitted from its training
    split only, then the rule in use chosen on the seen tasks' validation splits (``choose_rule``).

    ``features`` is ``make_subnet_features``'s function, ``counts`` ``make_subnet_counts``'s (``extra``: its
    trailing arguments), ``args`` the sub-networks' ``(params, batch_stats, owner)``.
    """
    inference = _fit_subnet_statistics(cfg, inference, scenario, t, features, args, batch_size, key)
    rule, info = choose_rule(cfg, task_inference.SUBNET_RULES, counts, (*args, inference),
                             [scenario.tasks[j].val for j in range(t + 1)], t + 1, batch_size, extra)
    return {**inference, "rule": jnp.int32(rule)}, info


def _fit_subnet_statistics(cfg: task_inference.InferenceConfig, inference, scenario, t: int, features: Callable,
                           args: tuple, batch_size: int, key: jax.Array):
    """Task ``t``'s task-inference statistics, from its training split only (features of its sub-networks)."""
    train = scenario.tasks[t].train
    kwargs = {"x": np.asarray(train.x.reshape(len(train.x), -1), np.float32) / 255.0}
    if "gauss_own" in inference:
        kwargs["own"] = features_of(features, args, train.x, t, batch_size)
    if "gauss_first" in inference:
        kwargs["first"] = features_of(features, args, train.x, 0, batch_size)
    return task_inference.fit_task(cfg, inference, t, train.y, len(scenario.tasks[t].classes), key=key, **kwargs)


def inference_report(inference, rules: tuple[str, ...], infos: list[dict]) -> dict:
    """results.json's ``task_inference``: the rule in use after each task, its validation evidence, bytes per task."""
    return {"task_inference": {"rules": list(rules), "rule_in_use": [i["task_inference"]["rule"] for i in infos],
                               "val_task_id": [i["task_inference"].get("val_task_id") for i in infos],
                               "bytes_per_task": task_inference.bytes_per_task(inference, rules)}}
