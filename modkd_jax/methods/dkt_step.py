"""DKT's per-agent computations: the step's batch, inputs and context, the two-head loss, the test counts and the
compiled functions on the agents axis (``agents.on_agents``) that ``methods.dkt`` runs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from modkd_jax import losses, training
from modkd_jax.agents import on_agents
from modkd_jax.data import batching
from modkd_jax.models import two_head

if TYPE_CHECKING:
    from modkd_jax.methods.dkt import DKTConfig

PyTree = Any


# ---------------------------------------------------------------------------- the train step


class Batch(NamedTuple):
    """One agent's batch: its own uint8 images and global labels, and this step's probe-set rows."""

    x: jax.Array
    y: jax.Array
    probe: jax.Array  # int32 indices into the shared probe images (probe mode's distillation inputs)


class Inputs(NamedTuple):
    """What the loss sees: standardised (augmented) inputs, labels, distillation inputs, teacher logits."""

    x: jax.Array
    y: jax.Array
    kd_x: jax.Array  # the probe batch (probe mode) or ``x`` (weights mode)
    teacher: jax.Array  # the teacher's masked CL-head logits on ``kd_x`` (stop-gradient)


class Context(NamedTuple):
    """What one agent's step needs besides the batch: its classes, its inbox, the KD weight, the probe set."""

    seen: jax.Array  # [C] bool: classes the agent has met (the CL head's support)
    message: PyTree  # what arrived from the teacher (probe logits, or weights + seen mask)
    has_teacher: jax.Array  # float32: 0 until a message arrived
    lam: jax.Array  # float32: weight of the distillation loss
    probe_x: jax.Array  # uint8: the shared probe images


def cl_logits(model: two_head.TwoHead, variables: PyTree, xf: jax.Array, seen: jax.Array) -> jax.Array:
    """A network's CL-head logits, unseen classes masked: what a teacher says."""
    return losses.masked_logits(model.apply(variables, xf, train=False)[0], seen)


def make_prepare(cfg: DKTConfig, model: two_head.TwoHead, mean, std) -> Callable:
    """``prepare(batch, key, ctx) -> Inputs`` for ``training.make_step``: augmentation and teacher targets."""

    def prepare(batch: Batch, key: jax.Array, ctx: Context) -> Inputs:
        xf = batching.augment(key, batch.x, mean, std, cfg.crop_flip)
        if cfg.exchange == "probe":
            kd_xf = batching.to_float(ctx.probe_x[batch.probe], mean, std)
            teacher = ctx.message["logits"][batch.probe]
        else:
            kd_xf = xf
            teacher = cl_logits(model, {"params": ctx.message["params"], "batch_stats": ctx.message["batch_stats"]},
                                kd_xf, ctx.message["seen"])
        return Inputs(xf, batch.y, kd_xf, jax.lax.stop_gradient(teacher))

    return prepare


def make_loss(cfg: DKTConfig, model: two_head.TwoHead) -> Callable:
    """``loss(params, batch_stats, inputs, ctx)``: CE of the CL head + ``lam * KD`` of the student head."""

    def loss_fn(params, batch_stats, inputs: Inputs, ctx: Context):
        variables = {"params": params, "batch_stats": batch_stats}
        (z_cl, z_st), new = model.apply(variables, inputs.x, train=True, mutable=["batch_stats"])
        if cfg.exchange == "probe":  # its own forward, its BN statistics discarded: lam=0 == alone exactly
            (_, z_st), _ = model.apply(variables, inputs.kd_x, train=True, mutable=["batch_stats"])
        z_cl = losses.masked_logits(z_cl, ctx.seen)
        ce = losses.cross_entropy(z_cl, inputs.y)
        z_st = losses.masked_logits(z_st, inputs.teacher > losses.MASK_VALUE / 2)
        T = cfg.temperature
        kd = (losses.kd_kl(z_st, inputs.teacher, T) if cfg.kd == "kl"
              else losses.mse_soft_targets(z_st, inputs.teacher, T))
        loss = ce + ctx.lam * ctx.has_teacher * kd
        return loss, (new["batch_stats"], {"ce": ce, "kd": kd, "acc": jnp.mean(jnp.argmax(z_cl, -1) == inputs.y)})

    return loss_fn


# ---------------------------------------------------------------------------- counts and the compiled functions


def make_counts(model: two_head.TwoHead, mean, std) -> Callable:
    """``counts(learner, classes, seen, taught, x, y, valid, true_task, seen_count)`` of one agent.

    Per rule, correct counts ``[T]`` per task of the agent (``classes`` ``[T, k]``, its
    class order) on a batch of the test set, plus ``rows`` (examples per task).
    """

    def counts(learner, classes, seen, taught, x, y, valid, true_task, seen_count):
        del true_task, seen_count  # every task's rows at once; the masks say what was seen
        variables = {"params": learner["params"], "batch_stats": learner["batch_stats"]}
        cl, st = model.apply(variables, batching.to_float(x, mean, std), train=False)
        T, k = classes.shape
        task = jnp.zeros(cl.shape[-1], jnp.int32).at[classes.reshape(-1)].set(jnp.repeat(jnp.arange(T), k))[y]
        own = classes[task]  # [B, k]: the classes of each row's task, in the task's order
        rows = valid[:, None] & (task[:, None] == jnp.arange(T))  # [B, T]

        def per_task(correct):
            return jnp.sum(rows & correct[:, None], axis=0)

        def til(z):
            return jnp.take_along_axis(own, jnp.argmax(jnp.take_along_axis(z, own, 1), -1)[:, None], 1)[:, 0] == y

        def cil(z, mask):
            return jnp.argmax(jnp.where(mask, z, -jnp.inf), -1) == y

        return {"cl_til": per_task(til(cl)), "cl_cil": per_task(cil(cl, seen)), "student_til": per_task(til(st)),
                "student_cil": per_task(cil(st, taught)), "rows": jnp.sum(rows, axis=0)}

    return counts


@functools.lru_cache(maxsize=16)
def make_functions(cfg: DKTConfig, model: two_head.TwoHead, mean: tuple[float, ...], std: tuple[float, ...],
                   mesh: Mesh | None) -> dict[str, Callable]:
    """The per-agent train step, message and counts functions, on the agents axis.

    Cached: runs with equal settings (a resumed run) share one set of compiled functions.
    """
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    tx = training.make_optimizer(cfg.optimizer, cfg.lr, inject=False, gate=False)
    step = training.make_step(make_loss(cfg, model), tx, make_prepare(cfg, model, mean, std), jit=False)

    def agent_step(learner, msg, has_teacher, data, shared):
        """One optimizer step of one agent on its own batch ``s`` of the experience (+ a probe batch)."""
        s = shared["s"]
        key = jax.random.fold_in(jax.random.wrap_key_data(data["key"]), s)
        rows = data["idx"][s]
        batch = Batch(data["x"][rows], data["y"][rows], data["pidx"][s])
        ctx = Context(data["seen"], msg, has_teacher, shared["lam"], shared["probe_x"])
        (params, bs, opt), metrics = step((learner["params"], learner["batch_stats"], learner["opt"]), batch, key,
                                          ctx)
        return {"params": params, "batch_stats": bs, "opt": opt}, metrics

    def message(learner, seen, shared):
        """What one agent sends: probe-set logits only (probe), or its weights and seen mask (weights)."""
        variables = {"params": learner["params"], "batch_stats": learner["batch_stats"]}
        if cfg.exchange == "probe":
            return {"logits": cl_logits(model, variables, batching.to_float(shared["probe_x"], mean, std), seen)}
        return jax.tree.map(jnp.copy, {**variables, "seen": seen})  # copies: the sender's buffers get donated

    return {"tx": tx,
            "step": on_agents(agent_step, mesh, 4, donate=(0,)),
            "message": on_agents(message, mesh, 2),
            "counts": on_agents(make_counts(model, mean, std), mesh, 4, n_shared=5)}
