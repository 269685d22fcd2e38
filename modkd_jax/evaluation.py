"""The one evaluator: fixed-size padded batches, correct counts per named rule, accuracies per split.

A method supplies a jitted *counts function* ``counts(*args, x, y, valid,
true_task, seen, *extra) -> {rule: correct count}`` (til, cil, the task-inference
rules, task_id, routing ...); ``accuracies`` runs it over every split and
divides. The counts functions shared by several methods (one network on one
class block, a sub-network's features) and the choice of the task-inference
rule live here too; the sub-networks of an owner map have their own evaluator,
which keeps each sub-network's outputs (``subnet_eval``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import masks, parallel, task_inference
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


class CountsFn(Protocol):
    """A method's counts function for ``accuracies``: ``(*args, x, y, valid, true_task, seen, *extra) ->
    {rule: correct count}`` on one fixed-size batch (``valid`` marks its real rows), jitted."""

    def __call__(self, *args: Any) -> dict[str, jax.Array]: ...


def batch_size_for(counts: Callable, batch_size: int) -> int:
    """The evaluation batch: ``batch_size`` rounded up to a multiple of a data-parallel function's devices.

    It never depends on a split's size, so every split of every task runs the one compiled program.
    """
    n = parallel.devices_of(counts)
    return -(-max(1, batch_size) // n) * n


@dataclasses.dataclass(frozen=True)
class Placed:
    """Splits resident on the device: their rows end to end (zero-padded by one batch), where each starts, its size.

    ``place`` builds it once; ``take`` picks splits without copying, so every evaluation of a run reads the
    same device buffers (no upload per task, no new shapes).
    """

    x: jax.Array
    y: jax.Array
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    batch_size: int  # the evaluation batch over these splits: at most the largest split (no padding to 512 rows)
    largest: int  # rows of the largest split placed (``take`` keeps it: per-split buffers keep one shape)

    def take(self, indices: Iterable[int]) -> "Placed":
        """The splits ``indices`` of these (same device buffers)."""
        indices = list(indices)
        return dataclasses.replace(self, starts=tuple(self.starts[i] for i in indices), sizes=tuple(self.sizes[i] for i in indices))

    def __len__(self) -> int:
        return len(self.sizes)

    def head(self, n: int) -> "Placed":
        """The first ``n`` rows of each split (every row where ``n`` is 0), same device buffers."""
        return self if n == 0 else dataclasses.replace(self, sizes=tuple(min(s, n) for s in self.sizes),
                                                       largest=min(self.largest, n))


def place(splits, batch_size: int, mesh=None) -> Placed:
    """``splits`` (``Split``s) on the device once, end to end, padded so that any split's last batch is in bounds.

    With a ``mesh`` the rows are replicated on every device (each device slices its share of a batch).
    The batch is ``batch_size`` capped at the largest split (rounded up to the mesh's devices): fixed for the
    run, since every task's split is placed at once, and no tiny split pays for a full batch.
    """
    sizes = tuple(len(s.y) for s in splits)
    n = 1 if mesh is None else mesh.devices.size
    batch_size = -(-max(1, min(batch_size, max(sizes, default=1))) // n) * n
    starts = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)[:-1]])) if sizes else ()
    first = splits[0]
    x = np.concatenate([np.asarray(s.x) for s in splits] + [np.zeros((batch_size, *first.x.shape[1:]), first.x.dtype)])
    y = np.concatenate([np.asarray(s.y) for s in splits] + [np.zeros((batch_size,), first.y.dtype)])
    put = jax.device_put if mesh is None else functools.partial(parallel.replicate, mesh)
    return Placed(put(x), put(y), starts, sizes, batch_size, max(sizes, default=0))


@functools.lru_cache(maxsize=32)
def _looped(counts: Callable, batch_size: int) -> Callable:
    """``run(args, x, y, start, size, true_task, seen, extra) -> summed counts`` over one placed split, jitted.

    One ``while`` loop of fixed-size batches inside one compiled call: no transfer or fetch per batch.
    A data-parallel ``counts`` runs its function on batches split along its mesh's ``data`` axis.
    """
    mesh = counts.mesh if isinstance(counts, parallel.DataParallel) else None
    fn = counts.fn if mesh is not None else counts

    def run(args, x, y, start, size, true_task, seen, extra):
        def batch(i):
            at = start + i * batch_size
            xb = jax.lax.dynamic_slice_in_dim(x, at, batch_size)
            yb = jax.lax.dynamic_slice_in_dim(y, at, batch_size)
            valid = i * batch_size + jnp.arange(batch_size) < size
            if mesh is not None:
                xb, yb, valid = parallel.constrain_batch(mesh, (xb, yb, valid))
            return fn(*args, xb, yb, valid, true_task, seen, *extra)

        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch, 0))
        count = (size + batch_size - 1) // batch_size
        return jax.lax.fori_loop(0, count, lambda i, tot: jax.tree.map(jnp.add, tot, batch(i)), zero)

    if mesh is None:
        return jax.jit(run)
    return parallel.data_parallel(run, mesh, batch_argnums=(), donate_argnums=())


def counts_per_split(counts: CountsFn, args: tuple, splits, seen: int, batch_size: int,
                     task_ids: Iterable[int] | None = None, extra: tuple = ()) -> list[tuple[dict, int]]:
    """``[(summed counts, examples)]`` per split; split ``i`` belongs to task ``task_ids[i]`` (default ``i``).

    ``splits`` is a ``Placed`` (device-resident: one compiled loop per split, one fetch per split) or a list
    of ``Split``s (fixed-size padded batches from the host).
    """
    task_ids = range(len(splits)) if task_ids is None else list(task_ids)
    if isinstance(splits, Placed):
        batch_size = batch_size_for(counts, min(batch_size, splits.batch_size))
        if batch_size > splits.batch_size:
            raise ValueError(f"a batch of {batch_size} overruns the splits' padding of {splits.batch_size}: place "
                             "them on the mesh of the counts function")
        run = _looped(counts, batch_size)
        totals = [run(args, splits.x, splits.y, jnp.int32(start), jnp.int32(n), jnp.int32(j), jnp.int32(seen),
                      tuple(extra)) if n else None
                  for j, start, n in zip(task_ids, splits.starts, splits.sizes)]
        return [(None if c is None else jax.tree.map(parallel.to_host, c), n) for c, n in zip(totals, splits.sizes)]
    batch_size = batch_size_for(counts, batch_size)
    out = []
    for j, split in zip(task_ids, splits):
        total = None
        for x, y, valid in pad_batches(split.x, split.y, batch_size):
            c = counts(*args, x, y, valid, jnp.int32(j), jnp.int32(seen), *extra)
            total = c if total is None else jax.tree.map(jnp.add, total, c)
        out.append((jax.tree.map(parallel.to_host, total) if total is not None else None, len(split.y)))
    return out


def accuracies(counts: CountsFn, args: tuple, splits, seen: int, batch_size: int,
               task_ids: Iterable[int] | None = None, extra: tuple = ()) -> dict[str, np.ndarray]:
    """Accuracy of every rule ``counts`` returns on each split: ``{rule: array of len(splits)}`` (NaN if empty).

    Args:
      counts: the method's jitted counts function (see the module docstring).
      args: its leading arguments (variables, owner map ...).
      splits: the ``Split``s to evaluate, or a ``Placed`` (device-resident).
      seen: the number of tasks learnt so far (class-incremental rules choose among them).
      batch_size: examples per call (padded).
      task_ids: the task of each split (default ``0, 1, ...``).
      extra: trailing arguments (the inference temperature ...).
    """
    per_split = counts_per_split(counts, args, splits, seen, batch_size, task_ids, extra)
    rules = next((tuple(c) for c, _ in per_split if c is not None), ())
    return {r: np.asarray([c[r] / n if n else np.nan for c, n in per_split], float) for r in rules}


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
    """Accuracy of ``counts`` (``make_block_counts``) on one split of ``task`` (a ``Split`` or a one-split
    ``Placed``); NaN for an empty split."""
    splits = split if isinstance(split, Placed) else [split]
    if sum(split.sizes if isinstance(split, Placed) else [len(split.y)]) == 0:
        return float("nan")
    return float(accuracies(counts, (variables,), splits, task + 1, batch_size, [task])["til"][0])


def make_subnet_features(apply_fn: Callable, mean, std) -> Callable:
    """``features(params, batch_stats, owner, x, task) -> (B, h)``: sub-network ``task``'s features, jitted."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def features(params, batch_stats, owner, x, task):
        gated = masks.gate(params, masks.forward_mask(owner, task))
        return apply_fn({"params": gated, "batch_stats": batch_stats}, batching.to_float(x, mean, std), task,
                        train=False, with_features=True)[1]

    return features


@functools.lru_cache(maxsize=32)
def _mapped(features: Callable, batch_size: int) -> Callable:
    """``run(args, x, task)``: ``features`` over ``x`` in batches (``lax.map``) inside one compiled call."""
    fn = features.fn if isinstance(features, parallel.DataParallel) else features

    def run(args, x, task):
        batches = x.reshape(x.shape[0] // batch_size, batch_size, *x.shape[1:])
        out = jax.lax.map(lambda xb: fn(*args, xb, task), batches)
        return out.reshape(x.shape[0], *out.shape[2:])

    return jax.jit(run)


def features_of(features: Callable, args: tuple, x, task: int, batch_size: int) -> jax.Array:
    """``features(*args, batch, task)`` of every image of ``x`` (host or device rows), in order: ``(n, h)`` on the
    device, computed in one compiled call (no fetch per batch)."""
    batch_size = batch_size_for(features, batch_size)
    n = len(x)
    pad = -n % batch_size
    x = jnp.asarray(x)
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    return _mapped(features, batch_size)(args, x, jnp.int32(task))[:n]


def head(splits, n: int):
    """The first ``n`` rows of each split (all of them for 0): a ``Placed`` or a list of ``Split``s."""
    if isinstance(splits, Placed):
        return splits.head(n)
    return [s if n == 0 else dataclasses.replace(s, x=s.x[:n], y=s.y[:n], y_global=s.y_global[:n]) for s in splits]


def choose_rule(cfg: task_inference.InferenceConfig, rules: tuple[str, ...], per_split: Callable, splits
                ) -> tuple[int, dict]:
    """The task-inference rule in use: ``(index into rules, info)``.

    A fixed rule is used as configured; ``auto`` takes the rule with the best task identification
    (``task_id_<rule>``) on ``splits``, the seen tasks' validation splits (never a test split), each cut to its
    first ``cfg.choice_examples`` rows; ``per_split(splits)`` returns ``[(counts, examples)]`` per split.
    """
    if cfg.task_inference != "auto":
        return rules.index(cfg.task_inference), {"rule": cfg.task_inference}
    counted = per_split(head(splits, cfg.choice_examples))
    examples = sum(n for _, n in counted)
    if examples == 0:
        raise ValueError("choosing the task-inference rule needs validation examples")
    val = {r: float(sum(c[f"task_id_{r}"] for c, n in counted if n)) / examples for r in rules}
    rule = task_inference.choose(val, rules)
    return rules.index(rule), {"rule": rule, "val_task_id": val}


def update_subnet_inference(cfg: task_inference.InferenceConfig, inference, scenario, t: int, train, val: Placed,
                            features: Callable, evaluator, args: tuple, batch_size: int, key: jax.Array, tau):
    """``(inference, info)`` after task ``t`` of a sub-network method: t's statistics fitted from its training
    split only, then the rule in use chosen on the seen tasks' validation splits (``choose_rule``).

    Args:
      cfg: the task-inference settings.
      inference: the statistics so far (``task_inference.init_stats``).
      scenario: the tasks (class counts).
      t: the task that just ended.
      train: its training split (a ``training.DeviceSplit`` or a host ``Split``).
      val: the seen tasks' validation splits.
      features: ``make_subnet_features``'s function.
      evaluator: the method's ``subnet_eval.SubnetEvaluator``.
      args: the sub-networks' ``(params, batch_stats, owner)``.
      batch_size: batch of the feature passes.
      key: PRNG key of the fits.
      tau: the inference temperature.
    """
    inference = _fit_subnet_statistics(cfg, inference, scenario, t, train, features, args, batch_size, key)
    candidates = cfg.candidates(task_inference.SUBNET_RULES)
    rule, info = choose_rule(cfg, candidates, lambda s: evaluator.counts((*args, inference), s, t + 1,
                                                                         rules=candidates, tau=tau), val)
    return {**inference, "rule": jnp.int32(rule)}, info


def _fit_subnet_statistics(cfg: task_inference.InferenceConfig, inference, scenario, t: int, train,
                           features: Callable, args: tuple, batch_size: int, key: jax.Array):
    """Task ``t``'s task-inference statistics from its training split only, on the device (padded rows masked)."""
    if not any(r in inference for r in task_inference.SUBNET_RULES):
        return inference  # no rule in use keeps statistics
    x, y = jnp.asarray(train.x), jnp.asarray(train.y)
    valid = jnp.arange(x.shape[0]) < len(train)
    kwargs = {"x": task_inference.pixels(x)}
    spaces = {task_inference.REGISTRY[r].space for r in task_inference.STAT_RULES if r in inference}
    if "own" in spaces:
        kwargs["own"] = features_of(features, args, x, t, batch_size)
    if "first" in spaces:
        kwargs["first"] = features_of(features, args, x, 0, batch_size)
    return task_inference.fit_task(cfg, inference, t, y, len(scenario.tasks[t].classes), valid=valid, key=key,
                                   **kwargs)


def inference_report(inference, rules: tuple[str, ...], infos: list[dict]) -> dict:
    """results.json's ``task_inference``: the rule in use after each task, its validation evidence, bytes per task."""
    return {"task_inference": {"rules": list(rules), "rule_in_use": [i["task_inference"]["rule"] for i in infos],
                               "val_task_id": [i["task_inference"].get("val_task_id") for i in infos],
                               "bytes_per_task": task_inference.bytes_per_task(inference, rules)}}
