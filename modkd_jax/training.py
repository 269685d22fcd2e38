"""The one train-step factory every method shares, the epoch loop around it, optimizers and EWC's Fisher.

A method supplies a loss over a ``Batch`` and its own context (task id, masks,
teacher variables as a NamedTuple); ``make_step`` adds the gradient, the
(gated) optimizer update and the jit boundary. Everything that changes between
tasks or epochs is an argument (the learning rate lives in the optimizer
state), so one compiled step serves a whole run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from modkd_jax import evaluation, losses, optim, parallel
from modkd_jax.data import batching

PyTree = Any


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """A gated optimizer whose learning rate is a hyperparameter set per epoch (no recompiles)."""
    if name == "adam":
        inner = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=weight_decay)
    elif name == "sgd":
        inner = optax.inject_hyperparams(
            lambda learning_rate: optax.chain(optax.add_decayed_weights(weight_decay),
                                              optax.sgd(learning_rate, momentum=0.9)))(learning_rate=lr)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgd'")
    return optim.gated(inner)


def set_learning_rate(opt_state, lr: float):
    """The same optimizer state with its injected learning rate replaced."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, jnp.asarray(hp["learning_rate"]).dtype)
    return opt_state._replace(hyperparams=hp)


def step_lr(base_lr: float, epoch: int, epochs: int, milestone: float) -> float:
    """``base_lr``, halved from epoch ``round(milestone * epochs)`` on (MultiStepLR with one milestone)."""
    return base_lr * (0.5 if epoch >= round(milestone * epochs) else 1.0)


def block(logits: jax.Array, task, size: int) -> jax.Array:
    """The class block of ``task`` (classes of other tasks never enter a loss)."""
    return jax.lax.dynamic_slice_in_dim(logits, task * size, size, axis=-1)


class Batch(NamedTuple):
    """One training batch: inputs (uint8 images or floats) and labels."""

    x: jax.Array
    y: jax.Array


@dataclasses.dataclass(frozen=True)
class Phase:
    """How one training phase runs: epochs, batch size, learning-rate schedule, last partial batch."""

    epochs: int
    batch_size: int
    lr: float
    milestone: float = 1.0  # lr halved from round(milestone * epochs) on (1.0: never)
    drop_last: bool = True


class Inputs(NamedTuple):
    """What a loss sees of one batch: standardised (augmented) inputs, labels, a frozen teacher's logits."""

    x: jax.Array
    y: jax.Array
    teacher: jax.Array | None = None


def augmenting(mean, std, crop_flip: bool = False, brightness: float = 0.0,
               teacher: Callable | None = None) -> Callable:
    """A ``prepare`` for ``make_step``: augment and standardise ``batch.x``; ``teacher(ctx, x)`` logits if given.

    The teacher's logits are computed outside the gradient (stop-gradient).
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def prepare(batch: Batch, key: jax.Array, ctx) -> Inputs:
        x = batching.augment(key, batch.x, mean, std, crop_flip, brightness=brightness)
        t = None if teacher is None else jax.lax.stop_gradient(teacher(ctx, x))
        return Inputs(x, batch.y, t)

    return prepare


def make_step(loss_fn: Callable, tx: optax.GradientTransformationExtraArgs, prepare: Callable | None = None,
              jit: bool = True) -> Callable:
    """The one train step: ``step(carry, batch, key, ctx) -> (carry, metrics)``, jitted with ``carry`` donated.

    Args:
      loss_fn: ``(params, batch_stats, inputs, ctx) -> (loss, (batch_stats, metrics))``.
      tx: the optimizer; a ``ctx`` with a ``trainable`` mask (not None) passes it as ``mask=``
        (``optim.gated``), the only extra argument.
      prepare: ``(batch, key, ctx) -> inputs`` outside the gradient (augmentation, frozen
        teachers' outputs); default: the batch itself.
      jit: return the plain function (to vmap or wrap it).

    ``carry = (params, batch_stats, opt_state)``; ``ctx`` is the method's context (a
    NamedTuple of arrays: task id, masks, teacher variables ...), so one compiled step
    serves every task and epoch of a run.
    """

    def step(carry, batch: Batch, key: jax.Array, ctx):
        params, batch_stats, opt_state = carry
        inputs = batch if prepare is None else prepare(batch, key, ctx)
        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, inputs, ctx)
        mask = getattr(ctx, "trainable", None)
        extra = {} if mask is None else {"mask": mask}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), {"loss": loss, **metrics}

    return jax.jit(step, donate_argnums=(0,)) if jit else step


def run_phase(step: Callable, carry, split, ctx, phase: Phase, key: jax.Array, *, desc: str = "",
              log: Callable[[dict], None] | None = None, progress: bool = False):
    """Train ``phase.epochs`` epochs of ``split`` with ``step`` (``make_step``); returns the final carry.

    Calls ``log`` once per epoch with the mean loss, accuracy and learning rate
    (batch means, each batch weighted alike). On a data-parallel step
    (``parallel.DataParallel``) batches are whole multiples of its devices; with
    ``phase.drop_last=False`` a last partial batch that does not split runs replicated.
    """
    n = len(split.y)
    if n == 0:
        raise ValueError(f"{desc or 'a phase'}: no training examples")
    batch_size = min(phase.batch_size, n)
    devices = parallel.devices_of(step)
    batch_size -= batch_size % devices
    if batch_size == 0:
        raise ValueError(f"{desc or 'a phase'}: {n} training examples, fewer than the {devices} devices")
    bar = tqdm(range(phase.epochs), desc=desc, leave=False, disable=not progress)
    for epoch in bar:
        lr = step_lr(phase.lr, epoch, phase.epochs, phase.milestone)
        params, bs, opt_state = carry
        carry = (params, bs, set_learning_rate(opt_state, lr))
        ekey, key = jax.random.split(key)
        bkey, akey = jax.random.split(ekey)
        sums, count = None, 0
        for i, (x, y) in enumerate(batching.epoch_batches(split.x, split.y, batch_size, bkey,
                                                          drop_remainder=phase.drop_last)):
            carry, m = step(carry, Batch(x, y), jax.random.fold_in(akey, i), ctx)
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
            count += 1
        means = {k: float(v) / count for k, v in sums.items()}
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means.get('acc', float('nan')):.3f}")
        if log is not None:
            log({"epoch": epoch, "lr": lr, **means})
    return carry


def make_fisher(apply_fn: Callable, block_size: int, mean, std, seen_classes: bool = False):
    """``fisher(variables, x, y, valid, task)``: per leaf, sum over valid examples of (d log p(y|x) / dw)^2; jitted.

    p is the softmax over the task's class block, or over every class up to and including
    the task's block (``seen_classes``: one head over all tasks seen so far); labels are
    task-local; per-example gradients by vmap.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def fisher(variables, x, y, valid, task):
        def log_p(params, xi, yi):
            logits = apply_fn({"params": params, "batch_stats": variables["batch_stats"]}, xi[None], task,
                              train=False)[0]
            if seen_classes:
                z = losses.masked_logits(logits, jnp.arange(logits.shape[-1]) < (task + 1) * block_size)
                return jax.nn.log_softmax(z)[yi + task * block_size]
            return jax.nn.log_softmax(block(logits, task, block_size))[yi]

        xf = batching.to_float(x, mean, std)
        grads = jax.vmap(jax.grad(log_p), in_axes=(None, 0, 0))(variables["params"], xf, y)
        w = valid.astype(jnp.float32)
        return jax.tree.map(lambda g: jnp.tensordot(w, jnp.square(g), axes=1), grads)

    return fisher


def fisher_diagonal(fisher, variables: PyTree, split, task: int, samples: int = 1024, batch_size: int = 128) -> PyTree:
    """Diagonal empirical Fisher (a mean) of ``task`` on the first ``samples`` examples of ``split``.

    ``fisher`` comes from ``make_fisher``.
    """
    n = min(samples, len(split.y))
    total = None
    for x, y, valid in evaluation.pad_batches(split.x[:n], split.y[:n], min(batch_size, n)):
        f = fisher(variables, x, y, valid, jnp.int32(task))
        total = f if total is None else jax.tree.map(jnp.add, total, f)
    return jax.tree.map(lambda v: v / n, total)
