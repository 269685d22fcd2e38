"""Collective distillation's students: their network and compiled steps on the agents axis, their training on
the probe tables, the central model (upper bound), and the gate through which an agent's student overrides it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import losses, models, training
from modkd_jax.agents import on_agents, place, stack_learners
from modkd_jax.data import batching
from modkd_jax.epochs import run_epoch
from modkd_jax.methods.collective_tables import NEG, dense, merge, own_tables, top_k_message
from modkd_jax.methods.kit import norm_of

if TYPE_CHECKING:
    from modkd_jax.methods.collective import CollectiveConfig, World

PyTree = Any
GATES = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01)  # own-class mass thresholds, largest first


def make_student_fns(cfg: CollectiveConfig, num_classes: int, norm, mesh) -> dict[str, Callable]:
    """The student's network, optimizer, train step and logits on the agents axis (``agents.on_agents``)."""
    net = models.build("mlp", num_classes, 1, hidden=tuple(cfg.student_hidden))
    tx = training.make_optimizer("adam", cfg.lr, inject=False, gate=False)
    mean, std = (jnp.asarray(v, jnp.float32) for v in norm)

    def loss_fn(params, batch_stats, inputs, ctx):
        variables = {"params": params, "batch_stats": batch_stats}
        n = inputs["x"].shape[0]  # own and probe rows in one pass: one set of batch-norm statistics for both
        z, new = net.apply(variables, jnp.concatenate([inputs["x"], inputs["probe_x"]]), 0, train=True,
                           mutable=["batch_stats"])
        z, zp = z[:n], z[n:]
        ce = losses.cross_entropy(losses.masked_logits(z, ctx["taught"]), inputs["y"])
        target = losses.masked_logits(inputs["target"], inputs["target"] > NEG)
        kd = losses.kd_kl(losses.masked_logits(zp, ctx["taught"]), target, 1.0)
        loss = ctx["own_weight"] * ce + ctx["lam"] * kd
        return loss, (new["batch_stats"], {"ce": ce, "kd": kd})

    def prepare(batch, key, ctx):
        del key
        return {"x": batching.to_float(batch["x"], mean, std), "y": batch["y"],
                "probe_x": batching.to_float(ctx["probe_x"][batch["probe"]], mean, std),
                "target": ctx["table"][batch["probe"]]}

    step = training.make_step(loss_fn, tx, prepare, jit=False)

    def agent_step(student, data, table, ctx, shared):
        s = shared["s"]
        rows = data["idx"][s]
        batch = {"x": data["x"][rows], "y": data["y"][rows], "probe": shared["pidx"][s]}
        c = {**ctx, "table": table, "probe_x": shared["probe_x"], "lam": shared["lam"]}
        carry, metrics = step((student["params"], student["batch_stats"], student["opt"]), batch, None, c)
        return {"params": carry[0], "batch_stats": carry[1], "opt": carry[2]}, metrics

    def logits(student, taught, x):
        z = net.apply({"params": student["params"], "batch_stats": student["batch_stats"]},
                      batching.to_float(x, mean, std), 0, train=False)
        return losses.masked_logits(z, taught)

    def send(table, k):
        return top_k_message(table, k)

    def receive(table, message, own, own_table):
        return merge(table, dense(message, num_classes), own, own_table)

    return {"net": net, "tx": tx,
            "step": on_agents(agent_step, mesh, 4, donate=(0,)),
            "logits": on_agents(logits, mesh, 2),
            "send": on_agents(lambda table, shared: send(table, cfg.top_k), mesh, 1),
            "receive": on_agents(lambda t, m, o, ot, shared: receive(t, m, o, ot), mesh, 4)}


def init_students(world: World, key: jax.Array) -> PyTree:
    """Fresh students, one per agent (keys folded in per agent), stacked on the agents axis."""
    students = stack_learners(lambda k: models.init(world.fns["net"], k, world.scenario.input_shape),
                              [jax.random.fold_in(key, a) for a in range(world.agents)], world.fns["tx"])
    return place(students, world.mesh)


def train_students(world: World, students: PyTree, table, taught: np.ndarray, data: dict, lam: float,
                   r: int, variant: int, epochs: int) -> PyTree:
    """``epochs`` passes over the probe set for every student at once, with batches of its own current task."""
    cfg, A, mesh = world.cfg, world.agents, world.mesh
    steps = max(1, len(world.probe_x) // cfg.batch_size)
    ctx = place({"taught": taught, "own_weight": data["own_weight"]}, mesh)
    for e in range(epochs):
        rngs = [np.random.default_rng([world.seed, 31, variant, a, r, e]) for a in range(A)]
        idx = np.stack([rng.integers(0, max(int(n), 1), (steps, cfg.batch_size)) for rng, n in zip(rngs, data["n"])])
        pidx = np.random.default_rng([world.seed, 37, variant, r, e]).permutation(len(world.probe_x))
        pidx = pidx[: steps * cfg.batch_size].reshape(steps, cfg.batch_size).astype(np.int32)
        per = {"x": data["x"], "y": data["y"], **place({"idx": idx.astype(np.int32)}, mesh)}
        shared = {"probe_x": world.probe_device, **place({"pidx": pidx, "lam": np.float32(lam)}, mesh, shared=True)}
        step = lambda students, s: world.fns["step"](students, per, table, ctx, {**shared, "s": s})  # noqa: E731
        students, _, _ = run_epoch(step, students, ((np.int32(s),) for s in range(steps)), metrics=False)
    return students


def train_joint(world: World, joint: PyTree, key: jax.Array) -> PyTree:
    """The central model: the student network trained on every agent's data, all classes (upper bound)."""
    cfg = world.cfg
    net, mean, std = world.fns["net"], *norm_of(world.scenario, jnp.float32)

    def loss_fn(params, batch_stats, inputs, ctx):
        z, new = net.apply({"params": params, "batch_stats": batch_stats}, inputs.x, 0, train=True,
                           mutable=["batch_stats"])
        ce = losses.cross_entropy(z, inputs.y)
        return ce, (new["batch_stats"], {})

    step = training.make_step(loss_fn, world.fns["tx"], training.augmenting(mean, std))
    x, y = world.joint_train
    carry = (joint["params"], joint["batch_stats"], world.fns["tx"].init(joint["params"]))
    for e in range(cfg.joint_epochs):
        order = np.random.default_rng([world.seed, 41, e]).permutation(len(y))
        rows = (order[s * cfg.batch_size:(s + 1) * cfg.batch_size] for s in range(len(y) // cfg.batch_size))
        batches = ((training.Batch(x[r], y[r]), jax.random.fold_in(key, s), None) for s, r in enumerate(rows))
        carry, _, _ = run_epoch(step, carry, batches, metrics=False)
    return {"params": carry[0], "batch_stats": carry[1]}


def student_view(world: World, students: PyTree, taught: np.ndarray, own: np.ndarray, x: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What every agent's student says of ``x``: own-class mass, best other class, best class (each ``[A, n]``)."""
    z = np.concatenate([np.asarray(world.fns["logits"](students, place(taught, world.mesh), xb))[:, valid]
                        for xb, _, valid in batching.pad_batches(x, np.zeros(len(x), np.int32),
                                                                   world.cfg.eval_batch_size)], axis=1)
    p = np.asarray(jax.nn.softmax(z, axis=-1))
    own_mass = np.sum(np.where(own[:, None, :], p, 0.0), axis=-1)
    other = np.argmax(np.where(own[:, None, :] | ~taught[:, None, :], -np.inf, z), axis=-1)
    return own_mass, other, np.argmax(z, axis=-1)


def gated(alone: np.ndarray, own_mass: np.ndarray, other: np.ndarray, gate, knows_others: np.ndarray) -> np.ndarray:
    """The agent's class: its own learner's when its student gives its own classes at least ``gate`` of the
    mass (or it knows no other class), else the student's best other class."""
    keep = (own_mass >= np.asarray(gate)[:, None]) | ~knows_others[:, None]
    return np.where(keep, alone, other)


def gate_inputs(world: World, agents: list, learnt: list[int]) -> dict[str, np.ndarray]:
    """The seen tasks' validation rows of every agent (``x``, global labels ``y``, ``owner`` agent) and each
    agent alone's prediction on them (``alone [A, n]``): what ``choose_gates`` reads, the same for every exchange."""
    vals = [[t.val for t in s.tasks[:n]] for s, n in zip(world.agent_scenarios, learnt)]
    x = np.concatenate([v.x for per in vals for v in per])
    return {"x": x, "y": np.concatenate([v.y_global for per in vals for v in per]),
            "owner": np.concatenate([np.full(len(v.y), a) for a, per in enumerate(vals) for v in per]),
            "alone": np.argmax(own_tables(world, agents, learnt, x), axis=-1)}


def choose_gates(world: World, students: PyTree, taught: np.ndarray, own: np.ndarray, val: dict[str, np.ndarray]
                 ) -> tuple[np.ndarray, list[dict]]:
    """Each agent's gate, on its own tasks' validation splits (never test; ``val`` from ``gate_inputs``): the largest
    of ``GATES`` whose own-class accuracy is within ``gate_tolerance`` of the agent alone's. Returns
    ``(gates [A], evidence)``."""
    gates, evidence = np.full(world.agents, GATES[-1], np.float32), []
    y, owner, alone = val["y"], val["owner"], val["alone"]
    own_mass, other, _ = student_view(world, students, taught, own, val["x"])
    knows = (taught & ~own).any(-1)
    for a in range(world.agents):
        rows = owner == a
        base = float(np.mean(alone[a][rows] == y[rows]))
        acc = {g: float(np.mean(gated(alone[a:a + 1, rows], own_mass[a:a + 1, rows], other[a:a + 1, rows], [g],
                                      knows[a:a + 1])[0] == y[rows])) for g in GATES}
        gates[a] = next((g for g in GATES if acc[g] >= base - world.cfg.gate_tolerance), GATES[-1])
        evidence.append({"alone": base, "gated": {str(g): v for g, v in acc.items()}, "gate": float(gates[a])})
    return gates, evidence
