"""Evaluation of the sub-networks of an owner map (MIND, PackNet): each sub-network's outputs on a split are
computed once and kept while what they depend on is unchanged; every rule reads them.

Sub-network t computes with the weights of tasks <= t, its own batch-norm row and class block, so once task
t ends it never changes: its class-block logits and its task-inference scores on a split are the same after
every later task. ``SubnetEvaluator`` keeps them per placed split in fixed-shape arrays ``(tasks, rows, ...)``
with a fingerprint of what each entry was computed from, and computes only the entries whose fingerprint
changed: after task t that is task t on every seen split, every seen task on split t, and the true task of
the splits not seen yet (their task-incremental accuracy). A T-task run then costs O(T^2) sub-network passes
over a split in all instead of O(T^3), for the test splits, the inference temperature and the rule choice
alike. ``entropy_grad`` reads every sub-network at once (superposed) and is recomputed when it is needed.
Class-incremental counts on a split whose task is not seen yet are 0 (no rule can pick an unseen task).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import masks, parallel, routing, task_inference
from modkd_jax.data import batching
from modkd_jax.evaluation import Placed

PyTree = Any
LOGITS = task_inference.LOGITS  # the outputs kept: "logits", and one score per (task, example) of each rule
STAT_OUTPUTS = task_inference.STAT_RULES  # that reads statistics (the registry's "stats" rules)
JOINT = next(r for r in task_inference.RULES if task_inference.REGISTRY[r].reads == task_inference.JOINT)
KEPT_SPLITS = 256  # splits whose outputs are kept (least recently used dropped first)


def output_of(rule: str) -> str:
    """The output a rule reads (``task_inference.REGISTRY``): the logits, or its own per-task score."""
    return LOGITS if task_inference.REGISTRY[rule].reads == task_inference.LOGITS else rule


def _outputs(rules: Iterable[str]) -> tuple[str, ...]:
    """The outputs ``rules`` read, the logits first (the task-incremental accuracy reads them)."""
    names = {output_of(r) for r in rules} | {LOGITS}
    return tuple(n for n in (LOGITS, *STAT_OUTPUTS, JOINT) if n in names)


def _hash(tree: PyTree) -> jax.Array:
    """A uint32 fingerprint of every bit of ``tree``'s leaves (a changed weight changes it)."""
    total = jnp.uint32(0)
    for j, leaf in enumerate(jax.tree.leaves(tree)):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            bits = jax.lax.bitcast_convert_type(leaf.astype(jnp.float32), jnp.uint32)
        else:
            bits = leaf.astype(jnp.uint32)
        bits = bits.ravel()
        weight = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(2 * j + 1)
        total = total * jnp.uint32(0x01000193) + jnp.sum(bits * weight, dtype=jnp.uint32)
    return total


@dataclasses.dataclass
class _Kept:
    """One split's kept outputs: device arrays ``{name: (T, capacity, ...)}`` and each entry's fingerprint."""

    source: jax.Array  # the placed rows (held: their id keys the entry, and must not be reused while it lives)
    arrays: dict
    prints: dict  # name -> (T,) uint32 of what each task's entry was computed from; None: never computed


class SubnetEvaluator:
    """Correct counts of every rule on placed splits for the sub-networks of an owner map, outputs kept per split.

    Args:
      apply_fn: the student's apply (``(variables, x, task, train, with_features)``).
      task_count: sub-networks (tasks) of the owner map.
      block_size: classes per task block.
      mean: per-channel mean of the input standardisation (``batching.to_float``).
      std: per-channel standard deviation of it.
      kinds: leaf kinds of the parameters (``entropy_grad``'s superposition).
      batch_size: examples per compiled batch (the splits' ``Placed.batch_size`` caps it).
      strategy: ``"map"`` computes the wanted sub-networks one after another (skipping the rest), ``"vmap"``
        batches every sub-network (faster for dense models on accelerators; computes all of them).
      mesh: data-parallel mesh (batches split along ``data``).
    """

    def __init__(self, apply_fn: Callable, task_count: int, block_size: int, mean, std, kinds: PyTree,
                 batch_size: int, strategy: str = "map", mesh=None):
        if strategy not in routing.STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(routing.STRATEGIES)}")
        self.apply_fn, self.T, self.k = apply_fn, task_count, block_size
        self.mean, self.std = jnp.asarray(mean), jnp.asarray(std)
        self.kinds, self.batch_size, self.strategy, self.mesh = kinds, batch_size, strategy, mesh
        self._kept: collections.OrderedDict[tuple, _Kept] = collections.OrderedDict()
        self._fingerprints = jax.jit(self._fingerprint_fn)
        # compiled pieces, per evaluator (a cache on the class would keep every evaluator and its outputs alive)
        self._refresher = functools.lru_cache(maxsize=32)(self._make_refresher)
        self._counter = functools.lru_cache(maxsize=32)(self._make_counter)
        self._shapes: dict[tuple, dict] = {}  # one abstract trace of the outputs per signature, not one per split

    def forget(self) -> None:
        """Drop every kept output (the next evaluation computes everything again)."""
        self._kept.clear()

    # ---- what an entry depends on -------------------------------------------------------------------------
    def _fingerprint_fn(self, params, batch_stats, owner, inference):
        """``{output: (T,) uint32}``: the fingerprint of what task t's entry of each output is computed from."""
        T = self.T

        def net(t):  # sub-network t: its forward weights and the batch-norm rows up to t
            rows = jax.tree.map(lambda s: jnp.where((jnp.arange(s.shape[0]) <= t).reshape((-1,) + (1,) * (s.ndim - 1)),
                                                    s, 0), batch_stats)
            return _hash((masks.gate(params, masks.forward_mask(owner, t)), rows))

        nets = jax.vmap(net)(jnp.arange(T))
        out = {LOGITS: nets}
        for name in STAT_OUTPUTS:
            if name in inference:
                stats = jax.vmap(lambda t, n=name: _hash(jax.tree.map(lambda v: v[t], inference[n])))(jnp.arange(T))
                space = task_inference.REGISTRY[name].space
                base = {"own": nets, "first": jnp.broadcast_to(nets[0], (T,))}.get(space, jnp.uint32(0))
                out[name] = stats * jnp.uint32(0x01000193) + base
        return out

    # ---- outputs of a batch -------------------------------------------------------------------------------
    def _batch_outputs(self, names, params, batch_stats, owner, inference, x, wanted, seen):
        """``{name: (T, B, ...)}`` for ``x``; entries not ``wanted`` (a ``(T,)`` bool per name) are zeros
        (``strategy="map"``: not computed at all)."""
        xf = batching.to_float(x, self.mean, self.std)
        B = x.shape[0]
        pix = task_inference.pixels(x)

        def net(t):
            gated = masks.gate(params, masks.forward_mask(owner, t))
            logits, h = self.apply_fn({"params": gated, "batch_stats": batch_stats}, xf, t, train=False,
                                      with_features=True)
            return jax.lax.dynamic_slice_in_dim(logits, t * self.k, self.k, axis=-1), h

        shape = jax.eval_shape(net, 0)
        none = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
        first = None
        on_first = [n for n in names if n in STAT_OUTPUTS and task_inference.REGISTRY[n].space == "first"]
        if on_first:  # one fixed space: sub-network 0's features
            want = jnp.any(jnp.stack([wanted[n] for n in on_first]))
            first = jax.lax.cond(want, lambda: net(0)[1], lambda: none(shape[1]))

        def score(name, t, h):
            space = {"pixels": pix, "own": h, "first": first}[task_inference.REGISTRY[name].space]
            return task_inference.task_score(name, jax.tree.map(lambda v: v[t], inference[name]), space)

        def one(t, w):
            cond = (lambda p, f, g: jax.lax.cond(p, f, g)) if self.strategy == "map" else (lambda p, f, g: f())
            need_net = w[LOGITS]
            for name in names:  # rules in the task's own features need its sub-network too
                if name in STAT_OUTPUTS and task_inference.REGISTRY[name].space == "own":
                    need_net = need_net | w[name]
            z, h = cond(need_net, lambda: net(t), lambda: jax.tree.map(none, shape))
            out = {LOGITS: z}
            for name in names:
                if name in STAT_OUTPUTS:
                    out[name] = cond(w[name], lambda n=name: score(n, t, h), lambda: jnp.zeros((B,), jnp.float32))
            return out

        per_task = {n: wanted[n] for n in names if n != JOINT}
        ts = jnp.arange(self.T)
        outs = (jax.lax.map(lambda a: one(*a), (ts, per_task)) if self.strategy == "map"
                else jax.vmap(one)(ts, per_task))
        outs = {n: jnp.where(wanted[n].reshape((-1,) + (1,) * (v.ndim - 1)), v, 0) for n, v in outs.items()}
        if JOINT in names:  # -dH/dalpha_t per example: higher is more like task t
            outs[JOINT] = jax.lax.cond(
                jnp.any(wanted[JOINT]),
                lambda: -task_inference.entropy_gradient(self.apply_fn, params, batch_stats, owner, self.kinds, xf,
                                                          seen, self.T, self.k).T,
                lambda: jnp.zeros((self.T, B), jnp.float32))
        return outs

    def _make_refresher(self, names: tuple[str, ...], batch_size: int) -> Callable:
        """``refresh(args, kept, x, start, size, wanted, seen) -> kept``: the wanted entries of one split's rows
        recomputed in one compiled loop over its batches, the others left as they are."""
        mesh = self.mesh

        def refresh(args, kept, x, start, size, wanted, seen):
            def body(i, kept):
                xb = jax.lax.dynamic_slice_in_dim(x, start + i * batch_size, batch_size)
                if mesh is not None:
                    xb = parallel.constrain_batch(mesh, xb)
                new = self._batch_outputs(names, *args, xb, wanted, seen)

                def put(old, fresh, w):
                    at = i * batch_size
                    cur = jax.lax.dynamic_slice_in_dim(old, at, batch_size, axis=1)
                    keep = w.reshape((-1,) + (1,) * (fresh.ndim - 1))
                    return jax.lax.dynamic_update_slice_in_dim(old, jnp.where(keep, fresh, cur), at, axis=1)

                return {n: put(kept[n], new[n], wanted[n]) for n in names}

            return jax.lax.fori_loop(0, (size + batch_size - 1) // batch_size, body, kept)

        if mesh is None:
            return jax.jit(refresh, donate_argnums=(1,))
        return parallel.data_parallel(refresh, mesh, batch_argnums=(), donate_argnums=(1,))

    # ---- counts from the kept outputs ---------------------------------------------------------------------
    def _make_counter(self, rules: tuple[str, ...], in_use: tuple[str, ...], with_taus: bool) -> Callable:
        """``count(kept, y_all, start, size, true_task, seen, tau, rule, taus) -> {rule: correct count}``, jitted."""

        def count(kept, y_all, start, size, true_task, seen, tau, rule, taus):
            logits = kept[LOGITS]  # (T, n, k)
            n = logits.shape[1]
            y = jnp.take(y_all, start + jnp.arange(n), mode="clip")
            valid = jnp.arange(n) < size
            cls = jnp.argmax(logits, axis=-1)
            known = true_task < seen  # a split of a task not seen yet: no rule can be right on it
            scores = {r: kept[output_of(r)] for r in set(rules) | set(in_use) if output_of(r) != LOGITS}
            out = {"til": jnp.sum(valid & (cls[true_task] == y))}
            tasks = task_inference.infer(rules, logits, seen, tau=tau, task_scores=scores)
            out.update(task_inference.rule_counts(tasks, cls, y, valid & known, true_task))
            if in_use:
                task = task_inference.infer_in_use(in_use, rule, logits, seen, known=tasks, tau=tau, task_scores=scores)
                out["cil"], out["task_id"] = task_inference.correct_counts(task, cls, y, valid & known, true_task)
            if with_taus:
                def correct(t):
                    task = routing.max_prob_task(jax.nn.softmax(logits / t, axis=-1), seen)
                    return jnp.sum(valid & known & (task == true_task) & (cls[task, jnp.arange(n)] == y))

                out["cil_tau"] = jax.vmap(correct)(taus)
            return out

        return jax.jit(count)

    # ---- the driver -----------------------------------------------------------------------------------------
    def _kept_for(self, placed: Placed, s: int, names: tuple[str, ...], args) -> _Kept:
        key = (id(placed.x), placed.starts[s], placed.sizes[s], names)
        if key not in self._kept:
            batch = self.batch_size_of(placed)
            n = -(-max(1, placed.largest) // batch) * batch  # every split of ``placed`` in one shape
            shapes = self._output_shapes(names, args, (batch, *placed.x.shape[1:]), placed.x.dtype)
            arrays = {m: jnp.zeros((sh.shape[0], n, *sh.shape[2:]), sh.dtype) for m, sh in shapes.items()}
            if self.mesh is not None:
                arrays = parallel.replicate(self.mesh, arrays)
            self._kept[key] = _Kept(placed.x, arrays, {m: None for m in names})
            while len(self._kept) > KEPT_SPLITS:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return self._kept[key]

    def _output_shapes(self, names: tuple[str, ...], args, x_shape: tuple[int, ...], x_dtype) -> dict:
        """``{name: ShapeDtypeStruct}`` of ``_batch_outputs`` on a batch of ``x_shape`` (traced once per signature)."""
        leaves, treedef = jax.tree.flatten(args)
        avals = tuple((np.shape(v), str(getattr(v, "dtype", type(v)))) for v in leaves)
        key = (names, x_shape, str(x_dtype), treedef, avals)
        if key not in self._shapes:
            self._shapes[key] = jax.eval_shape(lambda: self._batch_outputs(
                names, *args, jnp.zeros(x_shape, x_dtype), {m: jnp.zeros(self.T, bool) for m in names}, 1))
        return self._shapes[key]

    def batch_size_of(self, placed: Placed) -> int:
        """The compiled batch over ``placed``: ``batch_size`` capped by the splits' padding, a multiple of the mesh."""
        devices = 1 if self.mesh is None else self.mesh.shape["data"]
        size = -(-max(1, min(self.batch_size, placed.batch_size)) // devices) * devices
        if size > placed.batch_size:
            raise ValueError(f"a batch of {size} overruns the splits' padding of {placed.batch_size}: place them "
                             "on the evaluator's mesh")
        return size

    def counts(self, args: tuple, placed: Placed, seen: int, rules: tuple[str, ...] = (),
               in_use: tuple[str, ...] = (), tau=1.0, task_ids: Iterable[int] | None = None,
               taus: Iterable[float] | None = None) -> list[tuple[dict, int]]:
        """``[(correct counts, examples)]`` per split of ``placed`` (split ``i`` of task ``task_ids[i]``).

        Args:
          args: ``(params, batch_stats, owner, inference)``.
          placed: the splits (``evaluation.place``), resident on the device.
          seen: tasks learnt so far (the class-incremental rules choose among them).
          rules: rules whose ``cil_<rule>`` / ``task_id_<rule>`` counts are returned.
          in_use: the candidate rules; ``cil`` / ``task_id`` are those of ``in_use[inference["rule"]]``.
          tau: the inference temperature (``max_prob``, ``entropy``, ``top2_entropy``).
          task_ids: the task of each split (default ``0, 1, ...``).
          taus: candidate temperatures: also ``cil_tau`` ``(K,)``, the max-probability CIL at each.
        """
        rules, in_use = tuple(rules), tuple(in_use)
        names = _outputs(rules + in_use)
        used = rules + ((in_use[int(args[3]["rule"])],) if in_use else ())
        needed = set(_outputs(used))
        task_ids = range(len(placed)) if task_ids is None else list(task_ids)
        prints = jax.device_get(self._fingerprints(*args)) if len(placed) else {}
        batch_size = self.batch_size_of(placed)
        refresh, count = self._refresher(names, batch_size), self._counter(rules, in_use, taus is not None)
        taus = jnp.zeros(0) if taus is None else jnp.asarray(tuple(taus), jnp.float32)
        out = []
        for s, (j, start, size) in enumerate(zip(task_ids, placed.starts, placed.sizes)):
            if size == 0:
                out.append((None, 0))
                continue
            kept = self._kept_for(placed, s, names, args)
            relevant = np.arange(self.T) < seen if j < seen else np.zeros(self.T, bool)
            wanted = {}
            for name in names:
                want = relevant if name != LOGITS else relevant | (np.arange(self.T) == j)
                want = want & (name in needed)
                if name != JOINT and kept.prints[name] is not None:
                    want = want & (kept.prints[name] != prints[name])
                wanted[name] = want
            if any(w.any() for w in wanted.values()):
                kept.arrays = refresh(args, kept.arrays, placed.x, jnp.int32(start), jnp.int32(size),
                                      {n: jnp.asarray(w) for n, w in wanted.items()}, jnp.int32(seen))
                for name in names:
                    if name != JOINT:
                        old = np.zeros(self.T, np.uint32) if kept.prints[name] is None else kept.prints[name]
                        fresh = np.where(wanted[name], prints[name], old)
                        kept.prints[name] = fresh
            out.append((count(kept.arrays, placed.y, jnp.int32(start), jnp.int32(size), jnp.int32(j),
                              jnp.int32(seen), jnp.float32(tau), args[3]["rule"], taus), size))
        fetched = jax.device_get([c for c, _ in out])
        return [(c, n) for c, (_, n) in zip(fetched, out)]

    def accuracies(self, args: tuple, placed: Placed, seen: int, rules: tuple[str, ...] = (),
                   in_use: tuple[str, ...] = (), tau=1.0, task_ids: Iterable[int] | None = None) -> dict:
        """``{rule: accuracy per split}`` (``til``, ``cil_<rule>`` / ``task_id_<rule>`` of ``rules``, ``cil`` /
        ``task_id`` of the rule in use); NaN for an empty split.

        Args:
          args, placed, seen, rules, in_use, tau, task_ids: as in ``counts``.
        """
        per_split = self.counts(args, placed, seen, rules, in_use, tau, task_ids)
        names = next((tuple(c) for c, _ in per_split if c is not None), ())
        return {r: np.asarray([c[r] / n if n else np.nan for c, n in per_split], float) for r in names}

    def choose_tau(self, args: tuple, placed: Placed, seen: int, grid: Iterable[float]
                   ) -> tuple[float, dict[float, float]]:
        """The inference temperature of ``grid`` with the best max-probability CIL on ``placed`` (validation):
        ``(tau, {tau: accuracy})`` (``best_tau``).

        Args:
          args: ``(params, batch_stats, owner, inference)``.
          placed: the validation splits (``evaluation.place``), of tasks ``0, 1, ...``; not all empty.
          seen: tasks learnt so far (the max-probability rule chooses among them).
          grid: the candidate temperatures.
        """
        grid = tuple(float(t) for t in grid)
        per_split = self.counts(args, placed, seen, taus=grid)
        examples = sum(n for _, n in per_split)
        if examples == 0:
            raise ValueError("choosing the inference temperature needs validation examples")
        correct = np.sum([np.asarray(c["cil_tau"]) for c, n in per_split if n], axis=0)
        return best_tau({tau: float(c) / examples for tau, c in zip(grid, correct)})


def best_tau(acc: dict[float, float]) -> tuple[float, dict[float, float]]:
    """``(tau, acc)``: the temperature with the best accuracy; ties (e.g. 2-class blocks, where the rule does not
    depend on tau) go to the tau closest to 1 on a log scale."""
    best = max(acc.values())
    return min((t for t in acc if acc[t] == best), key=lambda t: abs(np.log(t))), acc
