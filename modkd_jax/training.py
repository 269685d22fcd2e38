"""The one train-step factory every method shares, the epoch loop around it and the optimizers.

A method supplies a loss over a ``Batch`` and its own context (task id, masks,
teacher variables as a NamedTuple); ``make_step`` adds the gradient, the
(gated) optimizer update and the jit boundary. Everything that changes between
tasks or epochs is an argument (the learning rate lives in the optimizer
state), so one compiled step serves a whole run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from modkd_jax import optim, parallel
from modkd_jax.data import batching

PyTree = Any


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, lr: float | Mapping[str, float | None], weight_decay: float = 0.0, *,
                   momentum: float = 0.9, groups=None, inject: bool = True, gate: bool = True
                   ) -> optax.GradientTransformation:
    """The one optimizer factory: Adam(W) or SGD with momentum, decoupled weight decay, optionally one learning
    rate per parameter group, behind the gate of ``optim.gated``.

    Args:
      name: ``"adam"`` (``optax.adamw``) or ``"sgd"`` (weight decay added to the gradient, then momentum SGD).
      lr: the learning rate, or ``{group: rate}`` per parameter group (None or 0: a frozen group) with ``groups``.
      weight_decay: decoupled weight decay (Adam) / L2 term (SGD).
      momentum: SGD momentum (0: none).
      groups: the group of every parameter (a pytree of names, or a function of the params) for per-group rates.
      inject: the single learning rate as a hyperparameter in the state (``set_learning_rate`` changes it per
        epoch without a recompile).
      gate: wrap in ``optim.gated`` (a ``mask=`` extra argument freezes weights bit for bit).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")

    def make(learning_rate):
        if name == "adam":
            return optax.adamw(learning_rate, weight_decay=weight_decay)
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum or None))

    if isinstance(lr, Mapping):
        if groups is None:
            raise ValueError("per-group learning rates need the parameters' groups")
        inner = optim.per_group_lr(lr, groups, make=make)
    elif not inject:
        inner = make(lr)
    elif name == "adam":  # its weight decay injected as well: the state and arithmetic MIND's runs have always had
        inner = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=weight_decay)
    else:
        inner = optax.inject_hyperparams(make)(learning_rate=lr)
    return optim.gated(inner) if gate else inner


def set_learning_rate(opt_state, lr: float):
    """The same optimizer state with its injected learning rate replaced.

    Args:
      opt_state: a state of ``make_optimizer`` with one injected learning rate (``inject=True``).
      lr: the new learning rate.
    """
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, jnp.asarray(hp["learning_rate"]).dtype)
    return opt_state._replace(hyperparams=hp)


def step_lr(base_lr: float, epoch: int, epochs: int, milestones: float | tuple[float, ...]) -> float:
    """``base_lr`` halved once per milestone reached: from epoch ``round(m * epochs)`` on for each fraction ``m``
    of ``milestones`` (one fraction or several; PyTorch's MultiStepLR with gamma 0.5, the MIND reference's).

    Args:
      base_lr: the phase's learning rate.
      epoch: the current epoch, from 0.
      epochs: the phase's number of epochs.
      milestones: the fractions of ``epochs`` where the rate halves (one, or several; ``()``: constant).
    """
    fractions = (milestones,) if isinstance(milestones, (int, float)) else tuple(milestones)
    return base_lr * 0.5 ** sum(epoch >= round(m * epochs) for m in fractions)


def block(logits: jax.Array, task, size: int) -> jax.Array:
    """The class block of ``task`` (classes of other tasks never enter a loss).

    Args:
      logits: ``[..., task_count * size]`` logits over every task's classes.
      task: the task index (may be traced).
      size: the classes per task.
    """
    return jax.lax.dynamic_slice_in_dim(logits, task * size, size, axis=-1)


class Batch(NamedTuple):
    """One training batch: inputs (uint8 images or floats), labels, and which rows are real (a padded last batch)."""

    x: jax.Array
    y: jax.Array
    valid: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Phase:
    """How one training phase runs: epochs, batch size, learning-rate schedule, last partial batch."""

    epochs: int
    batch_size: int
    lr: float
    milestones: float | tuple[float, ...] = ()  # lr halved from round(m * epochs) on, each m (step_lr)
    drop_last: bool = True


class Inputs(NamedTuple):
    """What a loss sees of one batch: standardised (augmented) inputs, labels, a frozen teacher's logits, and
    the real rows of a padded batch (None: all; a loss of a ``drop_last=False`` phase weights by it)."""

    x: jax.Array
    y: jax.Array
    teacher: jax.Array | None = None
    valid: jax.Array | None = None


class LossFn(Protocol):
    """A method's loss for ``make_step``: ``(params, batch_stats, inputs, ctx) -> (loss, (batch_stats, metrics))``.

    ``inputs`` is what ``PrepareFn`` made of the batch; ``ctx`` the method's context (a NamedTuple of arrays);
    the new batch statistics and a dict of scalar metrics come back beside the scalar loss (differentiated).
    """

    def __call__(self, params: PyTree, batch_stats: PyTree, inputs: "Inputs", ctx: Any
                 ) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]: ...


class PrepareFn(Protocol):
    """What ``make_step`` computes outside the gradient: ``(batch, key, ctx) -> Inputs`` (augmentation,
    standardisation, a frozen teacher's logits)."""

    def __call__(self, batch: "Batch", key: jax.Array, ctx: Any) -> "Inputs": ...


def augmenting(mean, std, crop_flip: bool = False, brightness: float = 0.0,
               teacher: Callable | None = None, pad: int = 4) -> PrepareFn:
    """A ``prepare`` for ``make_step``: augment and standardise ``batch.x``; ``teacher(ctx, x)`` logits if given.

    Args:
      mean: per-channel mean of the standardisation (``batching.to_float``).
      std: per-channel standard deviation of it.
      crop_flip: random crop (zero padding ``pad``) and horizontal flip.
      brightness: the largest random brightness change (0: none).
      teacher: ``teacher(ctx, x) -> logits`` on the prepared inputs, outside the gradient (stop-gradient).
      pad: the crop's padding in pixels.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def prepare(batch: Batch, key: jax.Array, ctx) -> Inputs:
        x = batching.augment(key, batch.x, mean, std, crop_flip, pad=pad, brightness=brightness)
        t = None if teacher is None else jax.lax.stop_gradient(teacher(ctx, x))
        return Inputs(x, batch.y, t, batch.valid)

    return prepare


def make_step(loss_fn: LossFn, tx: optax.GradientTransformationExtraArgs, prepare: PrepareFn | None = None,
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


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A training split resident on the device: rows padded with zeros to a fixed ``capacity`` (one shape for
    every task of a run), and how many are real."""

    x: jax.Array
    y: jax.Array
    n: int

    def __len__(self) -> int:
        return self.n


def place_split(split, capacity: int | None = None, mesh=None) -> DeviceSplit:
    """``split`` on the device once, zero-padded to ``capacity`` rows (default: its own size).

    Args:
      split: a host split with ``x`` and ``y`` arrays.
      capacity: the rows to pad to (at least ``len(split.y)``; None: no padding).
      mesh: a data-parallel step's mesh: the rows are replicated on every device, each gathers its share of
        every batch inside the compiled step (None: the default device).
    """
    n = len(split.y)
    capacity = n if capacity is None else capacity
    if capacity < n:
        raise ValueError(f"capacity {capacity} is smaller than the split ({n} rows)")
    x, y = np.asarray(split.x), np.asarray(split.y)
    if capacity > n:
        x = np.concatenate([x, np.zeros((capacity - n, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros((capacity - n,), y.dtype)])
    put = jax.device_put if mesh is None else functools.partial(parallel.replicate, mesh)
    return DeviceSplit(put(x), put(y), n)


@functools.partial(jax.jit, static_argnames=("capacity", "length"))
def epoch_order(key: jax.Array, n: jax.Array, capacity: int, length: int) -> jax.Array:
    """One epoch's row order: a random permutation of the first ``n`` of ``capacity`` rows, padded to ``length``.

    Args:
      key: the epoch's key (with ``n == capacity`` the order is ``jax.random.permutation(key, n)``).
      n: the real rows, first in the order (traced: the shape never depends on it).
      capacity: the split's rows, real and padding (static).
      length: the order's length, at least ``capacity`` (static; padded with row 0).
    """
    perm = jax.random.permutation(key, capacity)
    perm = perm[jnp.argsort(perm >= n, stable=True)]  # real rows first, in permuted order
    return jnp.concatenate([perm, jnp.zeros((length - capacity,), perm.dtype)]) if length > capacity else perm


LOOPS = ("auto", "epoch", "step")


def loop_for(loop: str, convolves: bool = True) -> str:
    """The dispatch granularity of ``run_phase``: ``"epoch"`` (one compiled call per epoch) or ``"step"``.

    Args:
      loop: ``"epoch"``, ``"step"`` or ``"auto"``: ``"epoch"`` except for a step with convolutions on XLA:CPU, which
        ran 20-25x slower inside a compiled loop than on its own (ResNet-32, ``benchmarks/accelerator.py``); there
        each step is one compiled call. A dense step runs as fast or faster in the loop (``benchmarks/hot_paths.py``).
      convolves: whether the step holds a convolution (``"auto"`` only).
    """
    if loop not in LOOPS:
        raise ValueError(f"unknown training loop {loop!r}; expected one of {', '.join(LOOPS)}")
    if loop == "auto":
        return "step" if convolves and jax.default_backend() == "cpu" else "epoch"
    return loop


def _step_signature(step: Callable, carry, data: "DeviceSplit", batch_size: int, masked: bool, ctx):
    """The jaxpr of one step of ``step`` on a batch of ``data`` (abstract: nothing is computed)."""
    fn = step.fn if isinstance(step, parallel.DataParallel) else step
    batch = Batch(jax.ShapeDtypeStruct((batch_size, *data.x.shape[1:]), data.x.dtype),
                  jax.ShapeDtypeStruct((batch_size,), data.y.dtype),
                  jax.ShapeDtypeStruct((batch_size,), jnp.bool_) if masked else None)
    return jax.make_jaxpr(fn, return_shape=True)(carry, batch, jax.random.key(0), ctx)


@functools.lru_cache(maxsize=32)
def _epoch_step(step: Callable, batch_size: int, masked: bool, loop: str) -> Callable:
    """The compiled training call of ``run_phase``; both kinds gather batches on the device (no host work).

    ``loop="epoch"``: ``epoch(carry, sums, order, key, x, y, n, count, ctx) -> (carry, sums)``, ``count`` steps
    in one ``fori_loop`` with a traced trip count (no recompile when a task's size changes). ``loop="step"``:
    ``one(carry, sums, i, order, key, x, y, n, ctx) -> (carry, sums, i + 1)``, step ``i`` alone, its counter
    and metric sums kept on the device. Step ``i`` gathers rows ``order[i * batch_size:][:batch_size]`` of the
    device split ``x, y``, folds ``i`` into ``key`` and adds its metrics to ``sums``; ``masked`` passes the padded
    last batch's ``valid`` rows (``i * batch_size + j < n``) to the step.
    """
    mesh = step.mesh if isinstance(step, parallel.DataParallel) else None
    fn = step.fn if mesh is not None else step

    def one(carry, sums, i, order, key, x, y, n, ctx):
        idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
        batch = Batch(jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0),
                      (i * batch_size + jnp.arange(batch_size) < n) if masked else None)
        if mesh is not None:
            batch = parallel.constrain_batch(mesh, batch)
        carry, m = fn(carry, batch, jax.random.fold_in(key, i), ctx)
        return carry, jax.tree.map(jnp.add, sums, m), i + 1

    def epoch(carry, sums, order, key, x, y, n, count, ctx):
        body = lambda i, state: one(*state, i, order, key, x, y, n, ctx)[:2]  # noqa: E731
        return jax.lax.fori_loop(0, count, body, (carry, sums))

    fun, donate = (epoch, (0, 1)) if loop == "epoch" else (one, (0, 1, 2))
    if mesh is None:
        return jax.jit(fun, donate_argnums=donate)
    return parallel.data_parallel(fun, mesh, batch_argnums=(), donate_argnums=donate)


def _metric_zeros(shapes) -> dict:
    """Zeros shaped like a step's metrics (``_step_signature``'s output shapes)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1])


def _convolves(jaxpr) -> bool:
    """Whether a (closed) jaxpr holds a convolution, at any depth (inside jit, scan, cond, custom rules ...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    if _convolves(sub):
                        return True
    return False


def run_phase(step: Callable, carry, split, ctx, phase: Phase, key: jax.Array, *, desc: str = "",
              log: Callable[[dict], None] | None = None, progress: bool = False, loop: str = "auto"):
    """Train ``phase.epochs`` epochs of ``split`` with ``step`` (``make_step``); returns the final carry.

    Args:
      step: ``make_step``'s train step, or a ``parallel.DataParallel`` of one (batch size: a multiple of its devices).
      carry: ``(params, batch_stats, opt_state)``; the learning rate is set each epoch (``step_lr``).
      split: a ``DeviceSplit`` (``place_split``: on the device, a fixed capacity) or a host ``Split`` (placed here);
        steps gather their batches, all of one size, on the device (``_epoch_step``).
      ctx: the method's context, passed to every step.
      phase: epochs, batch size and learning rate; with ``drop_last=False`` the last partial batch is padded and
        its ``valid`` rows reach the loss (``Inputs.valid``): every example is used, no shape changes between tasks.
      key: the phase's random key (row order and the step's key).
      desc: the progress bar's label, also named in errors.
      log: called once per epoch with the mean loss, accuracy and learning rate (batch means, each batch weighted
        alike), fetched once the next epoch is queued (the device never waits for the host).
      progress: show a progress bar over the epochs.
      loop: one compiled call per epoch or per step (``"epoch"``, ``"step"``, ``"auto"``: see ``loop_for``).
    """
    mesh = step.mesh if isinstance(step, parallel.DataParallel) else None
    data = split if isinstance(split, DeviceSplit) else place_split(split, mesh=mesh)
    n, capacity = data.n, int(data.x.shape[0])
    if n == 0:
        raise ValueError(f"{desc or 'a phase'}: no training examples")
    devices = parallel.devices_of(step)
    batch_size = min(phase.batch_size, n if phase.drop_last else capacity)
    batch_size -= batch_size % devices
    if batch_size == 0:
        raise ValueError(f"{desc or 'a phase'}: {n} training examples, fewer than the {devices} devices")
    count = n // batch_size if phase.drop_last else -(-n // batch_size)
    masked = not phase.drop_last
    length = max(capacity, -(-capacity // batch_size) * batch_size)
    jaxpr, shapes = _step_signature(step, carry, data, batch_size, masked, ctx)
    loop = loop_for(loop, _convolves(jaxpr))
    call = _epoch_step(step, batch_size, masked, loop)
    n_dev, count_dev = jnp.int32(n), jnp.int32(count)
    bar = tqdm(range(phase.epochs), desc=desc, leave=False, disable=not progress)
    pending = None  # the previous epoch's (epoch, lr, device sums), fetched once the next epoch is dispatched

    def report(epoch, lr, sums):
        means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means.get('acc', float('nan')):.3f}")
        if log is not None:
            log({"epoch": epoch, "lr": lr, **means})

    for epoch in bar:
        lr = step_lr(phase.lr, epoch, phase.epochs, phase.milestones)
        params, bs, opt_state = carry
        carry = (params, bs, set_learning_rate(opt_state, lr))
        ekey, key = jax.random.split(key)
        bkey, akey = jax.random.split(ekey)
        order = epoch_order(bkey, n_dev, capacity, length)
        sums = _metric_zeros(shapes)
        if loop == "epoch":
            carry, sums = call(carry, sums, order, akey, data.x, data.y, n_dev, count_dev, ctx)
        else:
            i = jnp.int32(0)
            for _ in range(count):
                carry, sums, i = call(carry, sums, i, order, akey, data.x, data.y, n_dev, ctx)
        if pending is not None:
            report(*pending)
        pending = (epoch, lr, sums)
    if pending is not None:
        report(*pending)
    return carry
