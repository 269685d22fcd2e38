"""Masked optax transforms: gate any optimizer by a mask pytree given at update time.

``optax.masked`` fixes its mask when the optimizer is built and passes raw
gradients through for masked leaves; continual learning needs a mask that
changes from task to task and frozen weights that stay *bit-identical* under
momentum, Adam moments and decoupled weight decay. ``gated`` does both::

    import jax.numpy as jnp, optax
    from modkd_jax import optim
    params = {"w": jnp.array([1.0, -0.0, 2.0])}
    mask = {"w": jnp.array([True, False, False])}
    tx = optim.gated(optax.adamw(1e-1, weight_decay=1e-2))
    state = tx.init(params)
    grads = {"w": jnp.ones(3)}
    updates, state = tx.update(grads, state, params, mask=mask)
    params = optax.apply_updates(params, updates)   # w[1] is still -0.0, w[2] still 2.0

How it stays exact: gradients are zeroed where the mask is False *before* the
inner optimizer (so no moment accumulates from them) and the final updates are
replaced by ``-0.0`` there *after* it (so momentum, Adam's bias correction and
weight decay cannot leak). ``x + (-0.0) == x`` bit for bit for every float x,
including ``-0.0`` itself, which ``x + 0.0`` would turn into ``+0.0``.

Rule for leaves: ``mask`` has the structure of the params; a leaf may be a
boolean array of the parameter's shape or a scalar bool (the whole leaf
trains or is frozen).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _keep(u: jax.Array, m) -> jax.Array:
    """``u`` where ``m``, else ``-0.0``: the additive identity that preserves every float bit."""
    return jnp.where(m, u, jnp.asarray(-0.0, u.dtype))


def gate_updates(updates: PyTree, mask: PyTree) -> PyTree:
    """Replace updates by ``-0.0`` where the mask is False (``params + updates`` then keeps them exactly).

    Args:
      updates: the optimizer's updates.
      mask: the params' structure; each leaf a boolean array of the leaf's shape or a scalar bool (True: trains).
    """
    return jax.tree.map(_keep, updates, mask)


def apply_gated(params: PyTree, updates: PyTree, mask: PyTree) -> PyTree:
    """``params + updates`` where the mask is True, the old parameter bits elsewhere (a select).

    Args:
      params: the parameters.
      updates: the optimizer's updates, the structure of ``params``.
      mask: the params' structure; each leaf a boolean array of the leaf's shape or a scalar bool (True: trains).
    """
    return jax.tree.map(lambda p, u, m: jnp.where(m, (p + u).astype(p.dtype), p), params, updates, mask)


def gated(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Gate ``inner`` by a mask given at update time: ``tx.update(grads, state, params, mask=m)``.

    Where ``m`` is False the parameter is bit-identical after ``optax.apply_updates``.
    The inner state of masked entries sees zero gradients (its moments decay
    but are never used for those entries while they stay masked). The result is
    an ``optax.GradientTransformationExtraArgs``: inside ``optax.chain`` the
    ``mask`` extra argument reaches it while transforms that take no extra
    arguments ignore it, and other extra arguments pass through to ``inner``.
    Its state is ``inner``'s state (``optax.inject_hyperparams`` stays reachable).
    """
    inner = optax.with_extra_args_support(inner)

    def init(params: PyTree) -> optax.OptState:
        return inner.init(params)

    def update(grads: PyTree, state: optax.OptState, params: PyTree | None = None, *, mask: PyTree,
               **extra_args):
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, mask)
        updates, state = inner.update(grads, state, params, **extra_args)
        return gate_updates(updates, mask), state

    return optax.GradientTransformationExtraArgs(init, update)


def frozen() -> optax.GradientTransformation:
    """Updates of ``-0.0`` everywhere: the group's weights never change, not even ``-0.0`` to ``+0.0``."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def per_group(
    transforms: Mapping[str, optax.GradientTransformation | None],
    labels: PyTree | Callable[[PyTree], PyTree],
) -> optax.GradientTransformation:
    """One optimizer per parameter group (``optax.partition``); ``None`` marks a frozen group.

    Example: ``per_group({"frozen": None, "shared": optax.sgd(1e-3), "task": optax.sgd(1e-2)}, labels)``.

    Args:
      transforms: ``{group name: optimizer}``; None freezes the group (updates of ``-0.0``, ``frozen``).
      labels: each leaf's group name: a pytree of the params' structure, or a function of the params.
    """
    txs = {name: (frozen() if tx is None else tx) for name, tx in transforms.items()}
    return optax.partition(txs, labels)


def per_group_lr(
    learning_rates: Mapping[str, float | None],
    labels: PyTree | Callable[[PyTree], PyTree],
    make: Callable[[float], optax.GradientTransformation] = optax.sgd,
) -> optax.GradientTransformation:
    """``per_group`` with one learning rate per group: ``{"frozen": None, "shared": 1e-3, "task": 1e-2}``.

    Args:
      learning_rates: ``{group name: learning rate}``; None or 0 freezes the group.
      labels: each leaf's group name: a pytree of the params' structure, or a function of the params.
      make: the optimizer of one group from its learning rate.
    """
    return per_group({k: (None if lr is None or lr == 0 else make(lr)) for k, lr in learning_rates.items()}, labels)
