"""The one jitted train step every method shares, the epoch loop around it, and evaluation.

A step trains the parameters a *trainable* mask allows, computing with those a
*forward* mask allows, on one task's class block, with cross-entropy plus an
optional distillation term against a teacher's logits. The task id, the masks,
the teacher's variables and the learning rate are arguments, so one compiled
step serves every task and epoch of a run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from modkd_jax import losses, masks, optim, routing
from modkd_jax.data import batching

PyTree = Any
# (teacher_variables, x_float, task) -> teacher logits on the task's classes
TeacherFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a train step computes; static across a run."""

    apply_fn: Callable  # a Flax ``model.apply``
    block_size: int  # classes per task block
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_flip: bool = False
    loss: str = "ce"  # "ce", or CE + beta * losses.distillation(loss, ...): "symkl" (MIND), "js", "kd"
    beta: float = 0.0
    temperature: float = 1.0  # distillation temperature T (never the inference temperature tau)
    brightness: float = 0.0  # brightness jitter: each image scaled by U[1 - b, 1 + b], clipped

    def __post_init__(self):
        if self.loss != "ce" and self.loss not in losses.DISTILL_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected 'ce' or one of {', '.join(losses.DISTILL_LOSSES)}")


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


def make_train_step(spec: StepSpec, tx: optax.GradientTransformationExtraArgs, teacher_fn: TeacherFn | None = None):
    """``step(carry, x, y, key, task, fwd_mask, trn_mask, teacher_vars) -> (carry, metrics)``, jitted.

    ``carry = (params, batch_stats, opt_state)`` is donated.
    """
    mean, std = jnp.asarray(spec.mean), jnp.asarray(spec.std)

    def step(carry, x, y, key, task, fwd_mask, trn_mask, teacher_vars):
        params, batch_stats, opt_state = carry
        xf = batching.augment(key, x, mean, std, spec.crop_flip, brightness=spec.brightness)
        t_logits = None if teacher_fn is None else jax.lax.stop_gradient(teacher_fn(teacher_vars, xf, task))

        def loss_fn(p):
            logits, new = spec.apply_fn({"params": masks.gate(p, fwd_mask), "batch_stats": batch_stats},
                                        xf, task, train=True, mutable=["batch_stats"])
            z = block(logits, task, spec.block_size)
            ce = losses.cross_entropy(z, y)
            if spec.loss == "ce":
                extra = jnp.zeros(())
            else:
                extra = losses.distillation(spec.loss, z, t_logits, spec.temperature)
            acc = jnp.mean(jnp.argmax(z, -1) == y)
            return ce + spec.beta * extra, (new["batch_stats"], {"ce": ce, "distill": extra, "acc": acc})

        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, mask=trn_mask)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), {"loss": loss, **metrics}

    return jax.jit(step, donate_argnums=(0,))


def run_phase(step, carry, split, *, epochs: int, batch_size: int, base_lr: float, milestone: float,
              key: jax.Array, task: int, fwd_mask: PyTree, trn_mask: PyTree, teacher_vars: PyTree = None,
              desc: str = "", log: Callable[[dict], None] | None = None, progress: bool = True,
              drop_last: bool = True):
    """Train ``epochs`` epochs of ``split`` with ``step``; returns the final carry.

    Calls ``log`` once per epoch with the mean loss, accuracy and learning rate
    (batch means, each batch weighted alike). ``drop_last=False`` also trains on
    the last partial batch (one more compiled shape; on a data-parallel step it
    runs replicated when it does not split over the devices).
    """
    n = len(split.y)
    if n == 0:
        raise ValueError(f"task {task} has no training examples")
    batch_size = min(batch_size, n)
    mesh = getattr(step, "mesh", None)  # a data-parallel step: whole batches per device
    if mesh is not None:
        devices = mesh.shape["data"]
        batch_size -= batch_size % devices
        if batch_size == 0:
            raise ValueError(f"task {task} has {n} training examples, fewer than the {mesh.shape['data']} devices")
    task_arr = jnp.asarray(task, jnp.int32)
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    for epoch in bar:
        lr = step_lr(base_lr, epoch, epochs, milestone)
        params, bs, opt_state = carry
        carry = (params, bs, set_learning_rate(opt_state, lr))
        ekey, key = jax.random.split(key)
        bkey, akey = jax.random.split(ekey)
        sums, count = None, 0
        for i, (x, y) in enumerate(batching.epoch_batches(split.x, split.y, batch_size, bkey,
                                                          drop_remainder=drop_last)):
            carry, m = step(carry, x, y, jax.random.fold_in(akey, i), task_arr, fwd_mask, trn_mask, teacher_vars)
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
            count += 1
        means = {k: float(v) / count for k, v in sums.items()}
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['acc']:.3f}")
        if log is not None:
            log({"epoch": epoch, "lr": lr, **means})
    return carry


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


def _eval_batch(evaluate, batch_size: int) -> int:
    """``batch_size`` (at least 1) rounded up to split evenly over a data-parallel evaluator's devices."""
    mesh = getattr(evaluate, "mesh", None)
    n = 1 if mesh is None else mesh.shape["data"]
    return -(-max(1, batch_size) // n) * n


def make_subnet_eval(apply_fn: Callable, task_count: int, block_size: int, mean, std):
    """``eval(params, batch_stats, owner, x, y, valid, true_task, seen, tau) -> correct counts per rule``, jitted.

    All ``task_count`` sub-networks run in one compiled call (``routing.subnet_logits``,
    its default strategy); the class-incremental rules choose among the first ``seen``
    from ``softmax(z_j / tau)``. ``tau`` (the inference temperature) is traced, so
    choosing it on validation data compiles nothing new.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def evaluate(params, batch_stats, owner, x, y, valid, true_task, seen, tau):
        xf = batching.to_float(x, mean, std)
        logits = routing.subnet_logits(apply_fn, params, batch_stats, owner, xf, task_count, block_size)
        probs = jax.nn.softmax(logits / tau, axis=-1)
        out = {rule: jnp.sum(valid & (task == true_task) & (cls == y))
               for rule, (task, cls) in routing.predictions(probs, true_task, seen).items()}
        out["task_id"] = jnp.sum(valid & (routing.max_prob_task(probs, seen) == true_task))
        return out

    return evaluate


def make_tau_eval(apply_fn: Callable, task_count: int, block_size: int, mean, std):
    """``eval(params, batch_stats, owner, x, y, valid, true_task, seen, taus) -> CIL correct counts per tau``, jitted.

    The max-probability rule's correct counts for every candidate inference
    temperature in ``taus`` (shape ``(K,)``), from one pass of the sub-networks.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def evaluate(params, batch_stats, owner, x, y, valid, true_task, seen, taus):
        logits = routing.subnet_logits(apply_fn, params, batch_stats, owner, batching.to_float(x, mean, std),
                                       task_count, block_size)

        cls = jnp.argmax(logits, axis=-1)  # (T, B): a block's predicted class does not depend on tau

        def correct(tau):
            task = routing.max_prob_task(jax.nn.softmax(logits / tau, axis=-1), seen)
            return jnp.sum(valid & (task == true_task) & (cls[task, jnp.arange(len(y))] == y))

        return jax.vmap(correct)(taus)

    return evaluate


def evaluate_tasks(evaluate, params, batch_stats, owner, splits, seen: int, batch_size: int,
                   task_ids: Iterable[int] | None = None, tau: float = 1.0) -> dict[str, np.ndarray]:
    """Accuracy of every rule on each split: ``{rule: array of len(splits)}``.

    Split ``i`` belongs to task ``task_ids[i]`` (default: ``i``); ``tau`` is the
    inference temperature.
    """
    totals = _count_tasks(evaluate, (params, batch_stats, owner), splits, seen, batch_size, task_ids,
                          jnp.float32(tau))
    rules = ("til", "cil", "cil_entropy", "task_id")
    return {k: np.asarray([t[k] / n if n else np.nan for t, n in totals]) for k in rules}


def _count_tasks(evaluate, state_args: tuple, splits, seen: int, batch_size: int, task_ids, *extra):
    """``[(summed counts, examples)]`` per split of ``evaluate(*state_args, x, y, valid, task, seen, *extra)``."""
    task_ids = range(len(splits)) if task_ids is None else list(task_ids)
    batch_size = _eval_batch(evaluate, min(batch_size, max(len(s.y) for s in splits)))  # small splits: pad less
    out = []
    for j, split in zip(task_ids, splits):
        total = None
        for x, y, valid in pad_batches(split.x, split.y, batch_size):
            counts = evaluate(*state_args, x, y, valid, jnp.int32(j), jnp.int32(seen), *extra)
            total = counts if total is None else jax.tree.map(jnp.add, total, counts)
        out.append((jax.tree.map(np.asarray, total), len(split.y)))
    return out


def choose_tau(tau_eval, params, batch_stats, owner, splits, seen: int, batch_size: int,
               grid: Iterable[float]) -> tuple[float, dict[float, float]]:
    """The inference temperature of ``grid`` with the best max-probability CIL on ``splits`` (validation data).

    Returns ``(tau, {tau: accuracy})``. Ties (e.g. 2-class blocks, where the rule
    does not depend on tau) go to the tau closest to 1 on a log scale.
    """
    grid = tuple(float(t) for t in grid)
    totals = _count_tasks(tau_eval, (params, batch_stats, owner), splits, seen, batch_size, None,
                          jnp.asarray(grid, jnp.float32))
    examples = sum(n for _, n in totals)
    if examples == 0:
        raise ValueError("choosing the inference temperature needs validation examples")
    correct = np.sum([np.asarray(c) for c, _ in totals], axis=0)
    acc = {tau: float(c) / examples for tau, c in zip(grid, correct)}
    best = max(acc.values())
    return min((t for t in grid if acc[t] == best), key=lambda t: abs(np.log(t))), acc


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
    for x, y, valid in pad_batches(split.x[:n], split.y[:n], min(batch_size, n)):
        f = fisher(variables, x, y, valid, jnp.int32(task))
        total = f if total is None else jax.tree.map(jnp.add, total, f)
    return jax.tree.map(lambda v: v / n, total)


def make_dense_eval(apply_fn: Callable, block_size: int, mean, std):
    """``eval(variables, x, y, valid, task) -> correct count`` of one network on one task's block, jitted."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def evaluate(variables, x, y, valid, task):
        logits = apply_fn(variables, batching.to_float(x, mean, std), task, train=False)
        return jnp.sum(valid & (jnp.argmax(block(logits, task, block_size), -1) == y))

    return evaluate


def dense_accuracy(evaluate, variables, split, task: int, batch_size: int) -> float:
    """Accuracy of ``evaluate`` (from ``make_dense_eval``) on one split; NaN for an empty split."""
    if len(split.y) == 0:
        return float("nan")
    batch_size = _eval_batch(evaluate, min(batch_size, len(split.y)))
    correct = sum(int(evaluate(variables, x, y, v, jnp.int32(task))) for x, y, v in pad_batches(split.x, split.y, batch_size))
    return correct / len(split.y)
