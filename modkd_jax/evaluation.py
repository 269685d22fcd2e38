"""The one evaluator: fixed-size padded batches, correct counts per named rule, accuracies per split.

A method supplies a jitted *counts function* ``counts(*args, x, y, valid,
true_task, seen, *extra) -> {rule: correct count}`` (til, cil, the task-inference
rules, task_id, routing ...); ``accuracies`` runs it over every split and
divides. Splits can be placed on the device once (``place``). The counts
functions shared by several methods (one network on one class block, a
sub-network's features) live here too; the sub-networks of an owner map have
their own evaluator, which keeps each sub-network's outputs (``subnet_eval``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import masks, parallel
from modkd_jax.data import batching


class CountsFn(Protocol):
    """A method's counts function for ``accuracies``: ``(*args, x, y, valid, true_task, seen, *extra) ->
    {rule: correct count}`` on one fixed-size batch (``valid`` marks its real rows), jitted."""

    def __call__(self, *args: Any) -> dict[str, jax.Array]: ...


def batch_size_for(counts: Callable, batch_size: int) -> int:
    """The evaluation batch: ``batch_size`` rounded up to a multiple of a data-parallel function's devices.

    It never depends on a split's size, so every split of every task runs the one compiled program.

    Args:
      counts: the counts (or features) function: jitted, or a ``parallel.DataParallel``.
      batch_size: the requested batch (at least 1 is used).
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

    Args:
      splits: a non-empty sequence of ``Split``s (every task's, placed at once).
      batch_size: the evaluation batch, capped at the largest split (rounded up to the mesh's devices): fixed
        for the run, and no tiny split pays for a full batch.
      mesh: the rows are replicated on every device of it (each device slices its share of a batch);
        None: the default device.
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

    Args:
      counts: the method's jitted counts function (``CountsFn``), or a ``parallel.DataParallel`` of one.
      args: its leading arguments (variables, owner map ...).
      splits: a ``Placed`` (device-resident: one compiled loop per split, one fetch per split) or a list
        of ``Split``s (fixed-size padded batches from the host).
      seen: the number of tasks learnt so far.
      batch_size: examples per call (padded; capped at a ``Placed``'s batch).
      task_ids: the task of each split (default ``0, 1, ...``).
      extra: trailing arguments of ``counts``.

    Returns:
      One ``(counts, examples)`` per split; counts as host arrays, None for an empty split.
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
        for x, y, valid in batching.pad_batches(split.x, split.y, batch_size):
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
    """``counts(variables, x, y, valid, task, seen) -> {"til": count}`` of one network on one task's block, jitted.

    Args:
      apply_fn: the model's ``apply(variables, x, task, train=False) -> logits``.
      block_size: the classes per task (``y`` is task-local).
      mean: per-channel mean of ``batching.to_float`` (``x`` comes as uint8).
      std: per-channel standard deviation of it.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(variables, x, y, valid, task, seen):
        logits = apply_fn(variables, batching.to_float(x, mean, std), task, train=False)
        z = jax.lax.dynamic_slice_in_dim(logits, task * block_size, block_size, axis=-1)
        return {"til": jnp.sum(valid & (jnp.argmax(z, -1) == y))}

    return counts


def block_accuracy(counts: Callable, variables, split, task: int, batch_size: int) -> float:
    """Accuracy of ``counts`` (``make_block_counts``) on one split of ``task`` (a ``Split`` or a one-split
    ``Placed``); NaN for an empty split.

    Args:
      counts: the function of ``make_block_counts``.
      variables: ``{"params", "batch_stats"}`` of the network.
      split: the task's ``Split``, or a ``Placed`` holding it alone.
      task: the task index (its class block).
      batch_size: examples per call.
    """
    splits = split if isinstance(split, Placed) else [split]
    if sum(split.sizes if isinstance(split, Placed) else [len(split.y)]) == 0:
        return float("nan")
    return float(accuracies(counts, (variables,), splits, task + 1, batch_size, [task])["til"][0])


def make_subnet_features(apply_fn: Callable, mean, std) -> Callable:
    """``features(params, batch_stats, owner, x, task) -> (B, h)``: sub-network ``task``'s features, jitted.

    Args:
      apply_fn: the model's ``apply(variables, x, task, train=False, with_features=True) -> (logits, features)``.
      mean: per-channel mean of ``batching.to_float`` (``x`` comes as uint8).
      std: per-channel standard deviation of it.
    """
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
    device, computed in one compiled call (no fetch per batch).

    Args:
      features: a features function (``make_subnet_features``), jitted or a ``parallel.DataParallel``.
      args: its leading arguments (``params, batch_stats, owner``).
      x: the images, ``[n, ...]``.
      task: the sub-network.
      batch_size: examples per batch (``x`` is zero-padded to a multiple).
    """
    batch_size = batch_size_for(features, batch_size)
    n = len(x)
    pad = -n % batch_size
    x = jnp.asarray(x)
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    return _mapped(features, batch_size)(args, x, jnp.int32(task))[:n]
