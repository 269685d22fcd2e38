"""Modular experts: a pool of small expert networks, similarity routing, specialization-driven allocation.

**Pool.** ``max_experts`` copies of one small MLP (``models.MLP``: per-task batch
norm rows, all tasks' class blocks side by side) stacked into one pytree with a
leading expert axis. Expert ``e`` serves the tasks ``membership[e]``; a task is
served by one expert, or by up to ``top_k`` reused experts mixed by soft top-k
routing weights.

**Router.** A fixed shared embedding: a Gaussian random projection of the raw
pixels in [0, 1] (``embed_dim`` wide, scaled by ``1/sqrt(embed_dim)``, so
cosines are preserved up to ~``1/sqrt(embed_dim)``; ``embed_dim=0`` uses the
pixels themselves), drawn once from the run's seed and never trained. Each
task gets ``prototypes`` centroids of its training inputs (spherical k-means
in the embedding, no raw data kept); an expert's prototypes are those of the
tasks it serves. Routing ``r(x) = argmax_e max_{p in e} cos(embed(x), p)``
(``routing.route``, jitted, batched); the task inside the expert is the task of
the best prototype. Training a task served by several experts mixes them with
``routing.soft_top_k`` over their similarity (the soft, differentiable variant).

**Specialization and allocation.** Routing statistics ``C[i, j]`` count the
held-out inputs of task ``j`` routed to expert ``i``; ``H(theta_i)`` is
``routing.specialization_entropy(C)`` (logged per expert after every task).
When task ``t`` arrives, an input *fits* expert ``e`` when its best cosine to
one of ``e``'s tasks reaches that task's radius (the ``radius_quantile``
quantile of the task's own training inputs' best cosine). ``e`` is reused when
(a) at least ``reuse_threshold`` of task ``t``'s inputs fit it and (b) its
specialization after taking them, ``H`` of ``C[e] + fit count at column t``,
stays at most ``max_entropy`` nats (default ``ln 2``: an expert may hold two
tasks evenly, not more); the best ``top_k`` such experts are reused, else a new
expert is allocated (``allocation="new"`` always allocates). With the pool
full, the best-fitting expert is reused ("forced"). A reused expert keeps its
earlier tasks through distillation (LwF: its pre-task outputs on their class
blocks, on the new task's inputs).

Pool, embedding, routing and allocation are ``methods.experts_routing``; size
and FLOPs per prediction ``methods.experts_cost``; retiring a model into a
wider one (knowledge preservation) is ``modkd_jax.preservation``.

**Contract.** ``learner(cfg, scenario)`` is the pool as a ``Learner`` for
``modkd_jax.loop``: the state holds the pool, the router (projection,
prototypes, radii, membership) and the routing statistics; the train step is
``training.make_step`` over ``make_loss``; ``make_counts`` gives every rule of
one batch in one compiled call for ``evaluation.accuracies``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import evaluation, losses, models, routing, task_inference, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, Split
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.methods import from_preset
from modkd_jax.methods.experts_cost import (compiled_flops, inference_flops, mlp_flops, pool_params,
                                            router_flops)
from modkd_jax.methods.experts_routing import (allocate, block_at, embed, fit_shares, init_pool, mix,
                                               random_projection, route, take, task_scores, task_weights)
from modkd_jax.methods.kit import block_size_of, norm_of, train_phase

PyTree = Any
ALLOCATIONS = ("entropy", "new")
INFERENCE = task_inference.LOGIT_RULES + ("gauss_input", "prototype")  # prototype: the router itself, last
RULES = ("til",) + task_inference.result_rules(INFERENCE) + ("routing", "activated")


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """Hyperparameters of a modular-experts run (defaults: MNIST) and of its knowledge-preservation protocol."""

    hidden: tuple[int, ...] = (128, 128)  # widths of one expert MLP
    max_experts: int = 0  # pool capacity; 0 = one per task
    embed_dim: int = 128  # random projection width; 0 = raw pixels
    prototypes: int = 20  # k-means centroids per task
    kmeans_iters: int = 20
    radius_quantile: float = 0.1  # an input fits a task when its best cosine reaches this quantile of the task's own
    allocation: str = "entropy"  # "entropy" (reuse when fit and specialization allow) | "new" (one expert per task)
    reuse_threshold: float = 0.5  # share of the new task's inputs that must fit an expert to reuse it
    max_entropy: float = math.log(2.0)  # specialization ceiling (nats) of a reused expert
    top_k: int = 2  # experts one task may reuse (mixed by soft top-k)
    route_temperature: float = 0.05  # soft top-k temperature on cosines
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.001
    lr_milestone: float = 0.7
    optimizer: str = "adam"
    distill_beta: float = 1.0  # LwF weight protecting a reused expert's earlier tasks
    distill_temperature: float = 2.0
    eval_batch_size: int = 512
    stats_examples: int = 2000  # held-out inputs per task for routing statistics
    old_hidden: tuple[int, ...] = (64, 64)  # preservation: widths of the deprecated model
    keep: float = 0.5  # preservation: share of each deprecated kernel kept by importance
    inference: task_inference.InferenceConfig = task_inference.InferenceConfig()  # class-incremental task inference

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}")
        if min(self.epochs, self.batch_size, self.prototypes, self.top_k, self.kmeans_iters, self.eval_batch_size,
               self.stats_examples, len(self.hidden), len(self.old_hidden), *self.hidden, *self.old_hidden) < 1:
            raise ValueError("epochs, batch_size, prototypes, top_k, kmeans_iters, eval_batch_size, stats_examples "
                             "and the hidden widths must be at least 1")
        if not 0.0 <= self.radius_quantile <= 1.0 or not 0.0 <= self.reuse_threshold <= 1.0:
            raise ValueError("radius_quantile and reuse_threshold must lie in [0, 1]")
        if self.max_experts < 0 or self.embed_dim < 0:
            raise ValueError("max_experts and embed_dim must be non-negative")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {self.keep}")


# Per-dataset presets: ExpertsConfig fields plus the scenario's task count and validation share.
_MNIST = dict(task_count=5, val_fraction=0.1, epochs=2)
PRESETS = {
    "mnist": _MNIST,
    "fashion_mnist": _MNIST,
    "digits": dict(task_count=5, val_fraction=0.1, epochs=20, batch_size=32, hidden=(32, 32), embed_dim=32,
                   prototypes=8, old_hidden=(16, 16)),
}


def preset_config(dataset: str, **overrides) -> ExpertsConfig:
    """The ExpertsConfig of a dataset's preset (``PRESETS``), with ``overrides``.

    Args:
      dataset: a key of ``PRESETS``.
      **overrides: ``ExpertsConfig`` fields that replace the preset's.
    """
    return from_preset(ExpertsConfig, PRESETS[dataset], **overrides)


# --- Training and evaluation ---------------------------------------------------------------------


class Inputs(NamedTuple):
    """What the pool's loss sees of one batch: standardised inputs, labels, the task's expert weights ``(B, S)``."""

    x: jax.Array
    y: jax.Array
    weights: jax.Array


class Context(NamedTuple):
    """What one train step needs besides the batch: the task, the router, its experts and the LwF teacher."""

    task: jax.Array  # int32 scalar
    router: PyTree
    slots: jax.Array  # (S,) the task's experts (S static: one compile per count)
    trainable: PyTree  # the gate of ``optim.gated``: the rows of ``slots``
    old: jax.Array | None = None  # (S, T) earlier tasks of each slot (LwF)
    teacher: PyTree = None  # the pool before the task (LwF)


def make_loss(model, cfg: ExpertsConfig, block_size: int, num_tasks: int, distill: bool) -> Callable:
    """CE of the task's soft top-k mixture, plus ``distill_beta *`` LwF on the reused experts' earlier tasks."""

    def loss_fn(params, batch_stats, inputs: Inputs, ctx: Context):
        sub_p, sub_bs = take(params, ctx.slots), take(batch_stats, ctx.slots)
        logits, new = jax.vmap(lambda p, b: model.apply({"params": p, "batch_stats": b}, inputs.x, ctx.task,
                                                        train=True, mutable=["batch_stats"]))(sub_p, sub_bs)
        mixed = mix(training.block(logits, ctx.task, block_size), inputs.weights)
        ce = -jnp.mean(jnp.take_along_axis(mixed, inputs.y[:, None], axis=1))
        extra = jnp.zeros(())
        if distill:
            def kd(p, b, tv, j):
                s = model.apply({"params": p, "batch_stats": b}, inputs.x, j, train=False)
                t = model.apply(tv, inputs.x, j, train=False)
                return losses.kd_kl(training.block(s, j, block_size), training.block(t, j, block_size),
                                    cfg.distill_temperature)

            tasks = jnp.arange(num_tasks)
            per = jax.vmap(lambda p, b, tv: jax.vmap(lambda j: kd(p, b, tv, j))(tasks))(
                sub_p, sub_bs, take(ctx.teacher, ctx.slots))
            extra = jnp.sum(jnp.where(ctx.old, per, 0.0)) / jnp.maximum(jnp.sum(ctx.old), 1)
        batch_stats = jax.tree.map(lambda a, n: a.at[ctx.slots].set(n), batch_stats, new["batch_stats"])
        acc = jnp.mean(jnp.argmax(mixed, -1) == inputs.y)
        return ce + cfg.distill_beta * extra, (batch_stats, {"ce": ce, "distill": extra, "acc": acc})

    return loss_fn


def make_counts(model, cfg: ExpertsConfig, block_size: int, mean, std) -> Callable:
    """``counts(pool, router, inference, x, y, valid, true_task, seen)`` of every rule in ``RULES``, jitted.

    til: the true task's experts; cil / task_id (and ``cil_<rule>`` / ``task_id_<rule>``): the task
    inferred by the rule in use (every rule of ``INFERENCE``; ``prototype`` is the router's), the class
    by that task's experts; routing: routed to an expert of the true task; activated: experts a
    prediction runs (its inferred task's). One compiled call runs every expert for every task (weight 0
    drops out exactly); the router holds what is seen.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(pool, router, inference, x, y, valid, true_task, seen):
        xf, emb = batching.to_float(x, mean, std), embed(router["projection"], x)
        expert, routed = route(router, emb)
        num_tasks = router["prototypes"].shape[0]

        def per_task(t):  # task t's mixture: log-probabilities (B, k) and free energy (B,)
            logits = block_at(jax.vmap(lambda v: model.apply(v, xf, t, train=False))(pool), t, block_size)
            w = task_weights(router, emb, t, cfg.top_k, cfg.route_temperature)  # (B, E)
            return mix(logits, w), jnp.sum(w.T * jax.nn.logsumexp(logits, axis=-1), axis=0)

        mixed, energy = jax.lax.map(per_task, jnp.arange(num_tasks))
        tasks = task_inference.infer(INFERENCE[:-1], mixed, seen, x=task_inference.pixels(x), stats=inference,
                                     energy=energy)
        tasks["prototype"] = routed
        cls = jnp.argmax(mixed, axis=-1)
        out = {"til": jnp.sum(valid & (cls[true_task] == y))}
        out.update(task_inference.rule_counts(tasks, cls, y, valid, true_task, inference["rule"]))
        chosen = jnp.stack([tasks[r] for r in INFERENCE])[inference["rule"]]
        member = router["membership"]
        out["routing"] = jnp.sum(valid & member[expert, true_task])
        out["activated"] = jnp.sum(jnp.where(valid, member[:, chosen].sum(0), 0))
        return out

    return counts


def make_stats_counts(cfg: ExpertsConfig) -> Callable:
    """``counts(router, x, y, valid, true_task, seen) -> {"to_expert": (E,)}``: routing statistics' column, jitted.

    An input routed to a task that several experts share (a tie of their
    prototypes) counts for each by its soft top-k weight.
    """

    @jax.jit
    def counts(router, x, y, valid, true_task, seen):
        emb = embed(router["projection"], x)
        expert, task = route(router, emb)
        w = task_weights(router, emb, task, cfg.top_k, cfg.route_temperature)
        single = router["membership"][:, task].sum(0) < 2
        share = jnp.where(single[:, None], jax.nn.one_hot(expert, w.shape[-1]), w)
        return {"to_expert": jnp.sum(jnp.where(valid[:, None], share, 0.0), axis=0)}

    return counts


@dataclasses.dataclass(frozen=True)
class Experts:
    """Everything static about a run: the expert network, compiled steps and counts functions."""

    cfg: ExpertsConfig
    scenario: Scenario
    model: Any
    block_size: int
    num_experts: int
    tx: Any
    steps: dict[bool, Callable]  # keyed by "distil (LwF)"
    counts: Callable
    stats_counts: Callable

    @property
    def task_count(self) -> int:
        return self.scenario.task_count


def setup(cfg: ExpertsConfig, scenario: Scenario) -> Experts:
    """Expert network, compiled steps and counts functions for ``cfg`` on ``scenario``.

    Args:
      cfg: the run's hyperparameters.
      scenario: the tasks, all with equally many classes.
    """
    k, T = block_size_of(scenario), scenario.task_count
    cfg.inference.check(INFERENCE, all(len(task.val.y) for task in scenario.tasks))
    model = models.build("mlp", k * T, T, hidden=tuple(cfg.hidden))
    mean, std = norm_of(scenario, jnp.float32)
    tx = training.make_optimizer(cfg.optimizer, cfg.lr)

    def prepare(batch: training.Batch, key: jax.Array, ctx: Context) -> Inputs:
        w = task_weights(ctx.router, embed(ctx.router["projection"], batch.x), ctx.task, cfg.top_k,
                         cfg.route_temperature)
        return Inputs(batching.augment(key, batch.x, mean, std, False), batch.y, jnp.take(w, ctx.slots, axis=1))

    steps = {d: training.make_step(make_loss(model, cfg, k, T, d), tx, prepare) for d in (False, True)}
    return Experts(cfg, scenario, model, k, cfg.max_experts or T, tx, steps, make_counts(model, cfg, k, mean, std),
                   make_stats_counts(cfg))


def init_state(ex: Experts, key: jax.Array) -> PyTree:
    """The pool before any task: random experts, none active, no prototypes."""
    k_pool, k_proj = jax.random.split(key)
    params, batch_stats = init_pool(ex.model, k_pool, ex.scenario.input_shape, ex.num_experts)
    T, E, K = ex.task_count, ex.num_experts, ex.cfg.prototypes
    in_dim = int(np.prod(ex.scenario.input_shape))
    router = {"projection": random_projection(k_proj, in_dim, ex.cfg.embed_dim),
              "prototypes": jnp.zeros((T, K, ex.cfg.embed_dim or in_dim), jnp.float32),
              "radius": jnp.full((T,), jnp.inf, jnp.float32), "membership": jnp.zeros((E, T), bool),
              "seen": jnp.zeros((T,), bool)}
    inference = task_inference.init_stats(ex.cfg.inference, INFERENCE, T, ex.block_size, in_dim,
                                          fitted=("gauss_input",))
    return {"params": params, "batch_stats": batch_stats, "router": router,
            "counts": jnp.zeros((E, T), jnp.float32), "active": jnp.zeros((E,), bool), "inference": inference}


def stats_split(ex: Experts, task) -> Split:
    """Held-out inputs of a task for routing statistics (validation split, else the first training inputs)."""
    split = task.val if len(task.val) else task.train
    n = min(len(split), ex.cfg.stats_examples)
    return Split(split.x[:n], split.y[:n], split.y_global[:n])


_embed_jit = jax.jit(embed)


def _embed_all(projection, x: np.ndarray) -> jax.Array:
    """Embeddings of many images, 4096 at a time."""
    return jnp.concatenate([_embed_jit(projection, x[i:i + 4096]) for i in range(0, len(x), 4096)])


def routing_statistics(ex: Experts, router: PyTree, seen: int) -> np.ndarray:
    """``C (E, T)``: held-out inputs of each seen task routed to each expert."""
    splits = [stats_split(ex, ex.scenario.tasks[j]) for j in range(seen)]
    counts = np.zeros((ex.num_experts, ex.task_count), np.float64)
    for j, (c, _) in enumerate(evaluation.counts_per_split(ex.stats_counts, (router,), splits, seen,
                                                           ex.cfg.eval_batch_size)):
        if c is not None:
            counts[:, j] = c["to_expert"]
    return counts


def learn_task(ex: Experts, state: PyTree, t: int, key: jax.Array, log: Callable[[dict], None] | None = None,
               progress: bool = False) -> tuple[PyTree, dict]:
    """Allocate experts for task ``t``, add its prototypes, train; returns the new state and a summary."""
    cfg, task = ex.cfg, ex.scenario.tasks[t]
    k_km, k_train = jax.random.split(key)
    router = dict(state["router"])
    active = np.asarray(state["active"]).copy()
    membership = np.asarray(router["membership"]).copy()
    # 1. fit of the new task's held-out inputs to every expert, then the allocation decision
    held = _embed_all(router["projection"], stats_split(ex, task).x)
    scores = task_scores(held, router["prototypes"], router["seen"])
    fit_count, share = fit_shares(scores, router["radius"], membership)
    experts, decision, alloc = allocate(cfg, t, np.asarray(state["counts"]), fit_count, share, active)
    # 2. the task's prototypes and fit radius, from its training inputs
    z = _embed_all(router["projection"], task.train.x)
    protos = routing.spherical_kmeans(k_km, z, min(cfg.prototypes, len(z)), cfg.kmeans_iters)
    protos = jnp.concatenate([protos, jnp.repeat(protos[:1], cfg.prototypes - protos.shape[0], 0)])
    own = jnp.max(z @ protos.T, axis=1)
    old = membership[np.sort(experts)].copy()  # earlier tasks of the chosen experts (LwF when reused)
    membership[experts, t] = True
    active[experts] = True
    router.update(prototypes=router["prototypes"].at[t].set(protos),
                  radius=router["radius"].at[t].set(jnp.quantile(own, cfg.radius_quantile)),
                  membership=jnp.asarray(membership), seen=router["seen"].at[t].set(True))
    # 3. train the chosen experts on the task (soft top-k mixture when several), LwF on their earlier tasks
    slots = np.flatnonzero(membership[:, t]).astype(np.int32)  # == sorted(experts)
    distill = bool(old.any())
    rows = jnp.asarray(membership[:, t])
    trn = jax.tree.map(lambda a: jnp.broadcast_to(rows.reshape((-1,) + (1,) * (a.ndim - 1)), a.shape),
                       state["params"])
    teacher = None  # a copy: the carry's buffers are donated to the step
    if distill:
        teacher = jax.tree.map(jnp.copy, {"params": state["params"], "batch_stats": state["batch_stats"]})
    ctx = Context(jnp.int32(t), router, jnp.asarray(slots), trn, jnp.asarray(old) if distill else None, teacher)
    phase = training.Phase(cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_milestone)
    params, batch_stats, _ = train_phase(ex.steps[distill], ex.tx, state["params"], state["batch_stats"], task.train,
                                         ctx, phase, k_train, task=t, name="train", log=log, progress=progress,
                                         desc=f"task {t} experts {experts}")
    counts = routing_statistics(ex, router, t + 1)
    # task inference: the task's Gaussians (its training pixels only), the rule in use on the seen tasks' validation
    inference = task_inference.fit_task(cfg.inference, state["inference"], t, task.train.y, len(task.classes),
                                        x=np.asarray(task_inference.pixels(task.train.x)), key=k_km)
    args = ({"params": params, "batch_stats": batch_stats}, router, inference)
    rule, choice = task_inference.choose_rule(
        cfg.inference, INFERENCE, lambda s: evaluation.counts_per_split(ex.counts, args, s, t + 1, cfg.eval_batch_size),
        [ex.scenario.tasks[j].val for j in range(t + 1)])
    inference["rule"] = jnp.int32(rule)
    state = {"params": params, "batch_stats": batch_stats, "router": router,
             "counts": jnp.asarray(counts, jnp.float32), "active": jnp.asarray(active), "inference": inference}
    info = {"task": t, "task_inference": choice, "experts": experts, "decision": decision,
            "fit_share": np.asarray(alloc["fit_share"]),
            "entropy_if_reused": np.asarray(alloc["entropy_if_reused"]),
            "specialization": np.asarray(routing.specialization_entropy(counts)), "routing_counts": np.asarray(counts),
            "active_experts": int(active.sum())}
    return state, info


def evaluate(ex: Experts, state: PyTree, splits, seen: int, task_ids=None) -> dict[str, np.ndarray]:
    """Per split, every rule of ``RULES`` (``make_counts``; ``activated`` as experts per prediction); NaN if unseen."""
    task_ids = list(range(len(splits)) if task_ids is None else task_ids)
    done = [i for i, j in enumerate(task_ids) if j < seen]
    pool = {"params": state["params"], "batch_stats": state["batch_stats"]}
    acc = evaluation.accuracies(ex.counts, (pool, state["router"], state["inference"]), [splits[i] for i in done],
                                seen, ex.cfg.eval_batch_size, [task_ids[i] for i in done])
    out = {r: np.full(len(splits), np.nan) for r in RULES}
    for r, values in acc.items():
        out[r][done] = values
    return out


def report(ex: Experts, state: PyTree, infos: list[dict]) -> dict:
    """FLOPs per prediction, membership, routing counts, pool size and task inference of a run.

    ``flops["til"]`` runs the true task's experts (plus the router when it mixes
    several); a class-incremental prediction costs ``flops["inference"]`` (the rule
    in use, ``inference_flops``) plus the final ``activated`` accuracy-matrix row's
    mean times ``flops["expert_forward"]``.
    """
    sc, cfg = ex.scenario, ex.cfg
    in_dim, T = int(np.prod(sc.input_shape)), ex.task_count
    expert = mlp_flops(in_dim, cfg.hidden, ex.block_size * T)
    one = take({"params": state["params"], "batch_stats": state["batch_stats"]}, 0)
    xla = compiled_flops(lambda v, x: ex.model.apply(v, x, 0, train=False), one,
                         jnp.zeros((1, *sc.input_shape), jnp.float32))
    membership = np.asarray(state["router"]["membership"])
    seen = np.asarray(state["router"]["seen"])
    til_activated = float(np.mean(membership[:, seen].sum(0))) if seen.any() else 0.0
    router = router_flops(in_dim, cfg.embed_dim, T * cfg.prototypes)
    inference = task_inference.inference_report(state["inference"], INFERENCE, infos)
    inference["task_inference"]["bytes_per_task"]["prototype"] = int(state["router"]["prototypes"][0].nbytes)
    rule = INFERENCE[int(state["inference"]["rule"])]
    gauss = jax.tree.map(np.asarray, state["inference"]["gauss_input"])
    return {"flops": {"til": til_activated * expert + (router if til_activated > 1 else 0),
                      "expert_forward": expert, "router": router, "xla_expert_forward": xla,
                      "inference": inference_flops(rule, in_dim, int(seen.sum()), membership, expert, router, gauss)},
            "membership": membership.tolist(), "routing_counts": np.asarray(state["counts"], float).tolist(),
            **inference}


def describe(info: dict) -> str:
    """The per-task line's extras: the task's experts, the decision, the active experts."""
    return f"experts {info['experts']} ({info['decision']}), {info['active_experts']} active"


def learner(cfg: ExpertsConfig, scenario: Scenario) -> Learner:
    """The expert pool as a ``Learner`` (rules ``RULES``; ``report`` gives FLOPs, membership, routing counts).

    Args:
      cfg: the run's hyperparameters.
      scenario: the tasks, all with equally many classes.
    """
    ex = setup(cfg, scenario)
    tests = [task.test for task in scenario.tasks]
    return Learner(
        name="experts", rules=("til", "cil", "task_id", "routing"), init_state=lambda key: init_state(ex, key),
        learn_task=lambda state, t, key, **kw: learn_task(ex, state, t, key, **kw),
        evaluate=lambda state, seen: evaluate(ex, state, tests, seen),
        param_counts=lambda state: pool_params(cfg, scenario), report=lambda state, infos: report(ex, state, infos),
        describe=describe, **scenario_fields(scenario))
