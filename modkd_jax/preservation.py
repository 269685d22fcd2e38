"""Knowledge preservation: a deprecated model's valuable weights carried into a new, wider one (copied and frozen
as its task's share, or distilled), so that retiring a model keeps what it learnt.

``importance`` (|w| or the diagonal empirical Fisher)
ranks a deprecated model's weights; ``select_valuable`` keeps the top
``keep`` fraction of each kernel plus the task's classifier block and batch
norm row; ``transfer`` copies exactly those entries into the leading corner of
the matching leaves of a (wider) new model, ``transfer_owner`` makes them the
task's frozen share of an owner map, so the new model computes the old task
with them alone while later tasks train the rest (``preserve``). Leaves whose
shapes do not fit (``transfer_plan``) are handed to distillation instead.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from modkd_jax import evaluation, losses, masks, models, training
from modkd_jax.fisher import fisher_diagonal, make_fisher
from modkd_jax.data.scenarios import Scenario
from modkd_jax.methods.kit import Context, block_size_of, make_loss, norm_of, train_phase

PyTree = Any


def _paths(tree: PyTree) -> dict[str, jax.Array]:
    """Leaves keyed by their '/'-joined path."""
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fits(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    return len(small) == len(big) and all(a <= b for a, b in zip(small, big))


def transfer_plan(old: PyTree, new: PyTree) -> dict[str, str]:
    """Per leaf of the old model: ``"copy"`` when a leaf of the new model with the same path has room for it
    (same rank, no axis smaller), else ``"distill"``."""
    new_leaves = _paths(new)
    return {path: "copy" if path in new_leaves and _fits(leaf.shape, new_leaves[path].shape) else "distill"
            for path, leaf in _paths(old).items()}


def importance(params: PyTree, kind: str = "magnitude", fisher: PyTree | None = None) -> PyTree:
    """Importance of every weight: ``|w|`` (``"magnitude"``) or a diagonal Fisher given in ``fisher``."""
    if kind == "magnitude":
        return jax.tree.map(jnp.abs, params)
    if kind == "fisher":
        if fisher is None:
            raise ValueError("importance='fisher' needs the Fisher diagonal (fisher.fisher_diagonal)")
        return fisher
    raise ValueError(f"unknown importance {kind!r}; expected 'magnitude' or 'fisher'")


def select_valuable(scores: PyTree, kinds: PyTree, task: int, keep: float, block_size: int) -> PyTree:
    """Boolean pytree (old shapes) of the weights worth keeping for ``task``.

    Gated kernels: the top ``keep`` fraction by ``scores`` (exactly
    ``round(keep * size)`` entries); classifier leaves: the task's class block;
    per-task leaves (batch norm): the task's row.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")

    def leaf(s, kind):
        if kind == masks.GATED:
            count = int(round(keep * s.size))
            flat = jnp.zeros(s.size, bool)
            if count:
                flat = flat.at[jax.lax.top_k(s.reshape(-1).astype(jnp.float32), count)[1]].set(True)
            return flat.reshape(s.shape)
        if kind == masks.CLASSIFIER:
            cols = (jnp.arange(s.shape[-1]) // block_size) == task
            return jnp.broadcast_to(cols, s.shape)
        return jnp.broadcast_to((jnp.arange(s.shape[0]) == task).reshape((-1,) + (1,) * (s.ndim - 1)), s.shape)

    return jax.tree.map(leaf, scores, kinds)


def embed_corner(small: jax.Array, shape: tuple[int, ...], fill) -> jax.Array:
    """``small`` placed at the leading corner of an array of ``shape``, ``fill`` elsewhere."""
    out = jnp.full(shape, fill, small.dtype)
    return out.at[tuple(slice(0, n) for n in small.shape)].set(small)


def transfer(old: PyTree, new: PyTree, selection: PyTree) -> PyTree:
    """``new`` with exactly the ``selection``ed entries of ``old`` copied in (leading corner of the same-path leaf).

    Every other entry of ``new`` is returned unchanged, bit for bit; leaves the
    plan marks ``"distill"`` are skipped (``transfer_plan``).
    """
    plan, old_l, sel_l = transfer_plan(old, new), _paths(old), _paths(selection)

    def leaf(path, n):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if plan.get(key) != "copy":
            return n
        where = embed_corner(sel_l[key], n.shape, False)
        return jnp.where(where, embed_corner(old_l[key].astype(n.dtype), n.shape, 0), n)

    return jax.tree_util.tree_map_with_path(leaf, new)


def transfer_owner(owner: PyTree, selection: PyTree, kinds: PyTree, task: int) -> PyTree:
    """An owner map in which ``task`` owns exactly the transferred gated weights (other owners untouched)."""
    sel_l = _paths(selection)

    def leaf(path, o, kind):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if kind != masks.GATED or key not in sel_l or not _fits(sel_l[key].shape, o.shape):
            return o
        return jnp.where(embed_corner(sel_l[key], o.shape, False), jnp.asarray(task, o.dtype), o)

    return jax.tree_util.tree_map_with_path(leaf, owner, kinds)


def transfer_batch_stats(old: PyTree, new: PyTree, task: int) -> PyTree:
    """``new`` running statistics with row ``task`` of the old model's copied in (leading corner)."""
    old_l = _paths(old)

    def leaf(path, n):
        o = old_l.get(jax.tree_util.keystr(path, simple=True, separator="/"))
        if o is None or not _fits(o.shape, n.shape):
            return n
        rows = embed_corner(jnp.broadcast_to((jnp.arange(o.shape[0]) == task)[:, None], o.shape), n.shape, False)
        return jnp.where(rows, embed_corner(o, n.shape, 0), n)

    return jax.tree_util.tree_map_with_path(leaf, new)


def make_distill_loss(apply_new: Callable, block_size: int, temperature: float) -> Callable:
    """Pure distillation (no labels) of the frozen old model's block (``inputs.teacher``) into ``ctx.forward``."""

    def loss_fn(params, batch_stats, inputs: training.Inputs, ctx: Context):
        logits, new = apply_new({"params": masks.gate(params, ctx.forward), "batch_stats": batch_stats}, inputs.x,
                                ctx.task, train=True, mutable=["batch_stats"])
        z = training.block(logits, ctx.task, block_size)
        agree = jnp.mean(jnp.argmax(z, -1) == jnp.argmax(inputs.teacher, -1))
        return losses.kd_kl(z, inputs.teacher, temperature), (new["batch_stats"], {"acc": agree})

    return loss_fn


def preserve(old_model, old_vars: PyTree, new_model, scenario: Scenario, key: jax.Array, *, old_task: int = 0,
             new_task: int = 1, method: str = "copy", importance_kind: str = "magnitude", keep: float = 0.5,
             epochs: int = 5, distill_epochs: int | None = None, batch_size: int = 128, lr: float = 0.001,
             temperature: float = 2.0, eval_batch_size: int = 512, progress: bool = False) -> dict:
    """Deprecate ``old_model`` (trained on ``old_task``) in favour of ``new_model`` and continue learning.

    ``method``: ``"copy"`` (valuable weights by ``importance_kind`` copied in and
    frozen as the old task's share), ``"distill"`` (the old task's share, a
    ``keep`` fraction drawn at random, distilled from the old model on the new
    task's inputs: no old data), ``"auto"`` (copy when every valuable leaf fits,
    else distill) or ``"none"`` (a fresh model). Then the new task trains the
    remaining weights. Returns accuracies on the old task before, right after the
    transfer and after the new task, the new task's, and what was copied.
    """
    k = block_size_of(scenario)
    mean, std = norm_of(scenario)
    old_t, new_t = scenario.tasks[old_task], scenario.tasks[new_task]
    T = scenario.task_count
    k_init, k_sel, k_dist, k_train = jax.random.split(key, 4)
    params, batch_stats = models.init(new_model, k_init, scenario.input_shape)
    kinds, old_kinds = models.leaf_kinds(params), models.leaf_kinds(old_vars["params"])
    owner = masks.init_owners(params, kinds, (k,) * T)
    plan = transfer_plan(old_vars["params"], params)
    if method == "auto":
        method = "copy" if all(v == "copy" for v in plan.values()) else "distill"
    if method not in ("copy", "distill", "none"):
        raise ValueError(f"unknown preservation method {method!r}; expected copy, distill, auto or none")
    old_counts = evaluation.make_block_counts(old_model.apply, k, mean, std)
    new_counts = evaluation.make_block_counts(new_model.apply, k, mean, std)
    info = {"method": method, "importance": importance_kind, "keep": keep,
            "old_acc": evaluation.block_accuracy(old_counts, old_vars, old_t.test, old_task, eval_batch_size),
            "plan": plan}
    tx = training.make_optimizer("adam", lr)
    if method == "copy":
        fisher = (fisher_diagonal(make_fisher(old_model.apply, k, mean, std), old_vars, old_t.train, old_task)
                  if importance_kind == "fisher" else None)
        selection = select_valuable(importance(old_vars["params"], importance_kind, fisher), old_kinds, old_task,
                                    keep, k)
        params = transfer(old_vars["params"], params, selection)
        batch_stats = transfer_batch_stats(old_vars["batch_stats"], batch_stats, old_task)
        owner = transfer_owner(owner, selection, kinds, old_task)
        sel_gated = [s for s, kd in zip(jax.tree.leaves(selection), jax.tree.leaves(old_kinds)) if kd == masks.GATED]
        info["copied_gated"] = int(sum(int(s.sum()) for s in sel_gated))
    elif method == "distill":
        # a random ``keep`` share of every gated layer becomes the old task's
        owner = masks.assign(owner, kinds, old_task, old_task + max(1, int(round(1 / max(keep, 1e-9)))),
                             policy="random", key=k_sel)
        params = masks.reinit_assigned(params, owner, kinds, old_task, "keep")
        teacher = lambda ctx, x: training.block(old_model.apply(ctx.teacher, x, ctx.task, train=False),  # noqa: E731
                                                ctx.task, k)
        step = training.make_step(make_distill_loss(new_model.apply, k, temperature), tx,
                                  training.augmenting(mean, std, teacher=teacher))
        ctx = Context(jnp.int32(old_task), masks.forward_mask(owner, old_task),
                           masks.trainable_mask(owner, old_task), old_vars)
        params, batch_stats, _ = train_phase(step, tx, params, batch_stats, new_t.train, ctx,
                                             training.Phase(distill_epochs or epochs, batch_size, lr, 0.7), k_dist,
                                             task=old_task, name="distill", desc="distill old model", progress=progress)
    gated_now = {"params": masks.gate(params, masks.forward_mask(owner, old_task)), "batch_stats": batch_stats}
    info["transferred_acc"] = evaluation.block_accuracy(new_counts, gated_now, old_t.test, old_task, eval_batch_size)
    # continue learning: the new task takes every weight the old task does not own
    owner = masks.assign(owner, kinds, new_task, new_task + 1, policy="random", key=k_sel)
    ctx = Context(jnp.int32(new_task), masks.forward_mask(owner, new_task), masks.trainable_mask(owner, new_task))
    step = training.make_step(make_loss(new_model.apply, k), tx, training.augmenting(mean, std))
    params, batch_stats, _ = train_phase(step, tx, params, batch_stats, new_t.train, ctx,
                                         training.Phase(epochs, batch_size, lr, 0.7), k_train, task=new_task,
                                         name="continue", desc="continue", progress=progress)
    for name, t, split in (("retained_acc", old_task, old_t.test), ("new_task_acc", new_task, new_t.test)):
        v = {"params": masks.gate(params, masks.forward_mask(owner, t)), "batch_stats": batch_stats}
        info[name] = evaluation.block_accuracy(new_counts, v, split, t, eval_batch_size)
    info["retained_fraction"] = info["retained_acc"] / max(info["old_acc"], 1e-9)
    return info
