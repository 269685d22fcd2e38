"""Collective distillation: agents that learn what only their peers saw, from soft targets on a probe set.

The classes of a dataset are cut into tasks (``class_split``) and the tasks
dealt round-robin to ``N`` agents: agent ``a`` learns tasks ``a, a+N, ...`` one
after another with its own non-forgetting learner (MIND, task inference
``gauss_input``). It never sees another agent's labelled data or weights.

What an agent knows, it states as a *joint score table* on a shared unlabelled
probe set (held out of every agent's training data): for every probe image x
and every class c of a task t it learnt,
``L[x, c] = log p(x | t) + log softmax(z_t(x))_c`` (t's pixel Gaussians, fitted
when t ended, and t's own sub-network). These scores are comparable across
agents (one pixel space, normalised densities), so combining teachers is Bayes'
rule over the union of their tables, each teacher weighted by how well its
classes explain the input, not an average. Tables from different origins merge
by an element-wise maximum (an origin's entries never change once its task is
learnt), so agents relay what they received: on a ring, ``N - 1`` hops per
round bring every class to every agent.

Messages (variant ``probe``): the top ``top_k`` entries of the table per
probe image, class ids uint8 and scores float16; nothing else crosses (the
``weights`` baseline sends the MIND models themselves and the receiver computes
their tables; both variants run side by side in one run). Each agent's
**student** (an MLP over all classes, the MIND network's width) is distilled
from ``softmax(L)`` on the probe set (weight ``lam``) and trained on its own
current task's labels. An agent predicts with
the student as a gate: if the student puts at least ``gate`` of its mass on the
agent's own classes, the agent's own learner decides among them (its own
scores); otherwise the student's best other class. ``gate`` is chosen per agent
on its own tasks' validation splits (``choose_gates``: the largest threshold
that keeps its own-class accuracy within ``gate_tolerance`` of the agent
alone's). With nothing taught (``lam == 0``) the agent is exactly its own learner.

All students and tables live on a leading agents axis (``dkt.on_agents``:
vmapped, or ``shard_map`` over a mesh) and move between agents only through
``dkt.shift_agents``; the MIND learners are per agent (their task counts differ).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from modkd_jax import evaluation, losses, models, routing, task_inference, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, class_split
from modkd_jax.data.sources import Dataset
from modkd_jax.learner import Learner
from modkd_jax.methods import dkt, mind

PyTree = Any
VARIANTS = ("probe", "weights")  # what travels: top-k table entries, or the learners' models
RULES = ("collective", "weights", "alone", "student")  # per agent: accuracy on each round's classes
RULE_OF = {"probe": "collective", "weights": "weights"}
GATES = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01)  # own-class mass thresholds, largest first
NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class CollectiveConfig:
    """Hyperparameters of a collective run (defaults: (Fashion-)MNIST)."""

    agents: int = 3
    task_count: int = 5  # tasks the classes are cut into, dealt round-robin to the agents
    topology: str = "ring"  # ring: from a+1 every hop; gossip: from a+s, s random per hop
    hops: int = 0  # exchange hops per round (0: agents - 1, every class reaches every agent on a ring)
    lam: float = 1.0  # weight of the probe distillation (0: the agent alone)
    n_probe: int = 5000  # unlabelled probe images held out of every agent's training data
    top_k: int = 2  # table entries sent per probe image
    student_hidden: tuple[int, ...] = (400, 400)
    student_epochs: int = 20  # per round, over the probe set
    joint_epochs: int = 5  # the central model on every agent's data (upper bound)
    batch_size: int = 128
    lr: float = 1e-3
    gate_tolerance: float = 0.005  # own-class validation accuracy the gate may give up against the agent alone
    eval_batch_size: int = 1000

    def __post_init__(self):
        checks = [(2 <= self.agents <= 10, f"agents must be in [2, 10], got {self.agents}"),
                  (self.task_count >= self.agents, f"task_count {self.task_count} < agents {self.agents}: "
                                                   "every agent needs a task"),
                  (self.topology in dkt.TOPOLOGIES, f"unknown topology {self.topology!r}; expected one of "
                                                    f"{dkt.TOPOLOGIES}"),
                  (self.hops >= 0 and self.lam >= 0, "hops and lam must be >= 0"),
                  (0 <= self.gate_tolerance < 1, f"gate_tolerance must be in [0, 1), got {self.gate_tolerance}"),
                  (min(self.n_probe, self.top_k, self.student_epochs, self.joint_epochs, self.batch_size,
                       self.eval_batch_size) >= 1, "n_probe, top_k, epochs and batch sizes must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def hops_per_round(self) -> int:
        return self.hops or self.agents - 1


# ---------------------------------------------------------------------------- data


def deal(scenario: Scenario, agents: int) -> list[Scenario]:
    """Agent ``a``'s scenario: tasks ``a, a + agents, ...`` of ``scenario``, in that order."""
    return [dataclasses.replace(scenario, name=f"{scenario.name}-agent{a}", tasks=scenario.tasks[a::agents])
            for a in range(agents)]


def rounds_of(scenarios: list[Scenario]) -> int:
    """Rounds of the run: the most tasks any agent has."""
    return max(s.task_count for s in scenarios)


def round_classes(scenarios: list[Scenario], r: int) -> np.ndarray:
    """The classes of every agent's task ``r`` (the column ``r`` of the accuracy rows)."""
    return np.concatenate([s.tasks[r].classes for s in scenarios if r < s.task_count])


def own_mask(scenario: Scenario, learnt: int, num_classes: int) -> np.ndarray:
    """Boolean ``[C]``: the classes of the agent's first ``learnt`` tasks."""
    mask = np.zeros(num_classes, bool)
    for task in scenario.tasks[:learnt]:
        mask[task.classes] = True
    return mask


# ---------------------------------------------------------------------------- joint score tables


def make_table(m: mind.Mind, classes: np.ndarray, num_classes: int) -> Callable:
    """``table(params, batch_stats, owner, inference, x, seen) -> (B, C)``: one MIND learner's joint scores.

    ``log p(x | t) + log softmax(z_t(x))`` for the classes of its first ``seen`` tasks, ``-inf`` elsewhere.
    """
    mean, std = (jnp.asarray(v, jnp.float32) for v in m.scenario.norm)
    cols = jnp.asarray(classes.reshape(-1), jnp.int32)
    T, k = classes.shape

    @jax.jit
    def table(params, batch_stats, owner, inference, x, seen):
        logits = routing.subnet_logits(m.student.apply, params, batch_stats, owner, batching.to_float(x, mean, std),
                                       T, k)
        density = task_inference.scores("gauss_input", logits, seen, x=task_inference.pixels(x), stats=inference)
        joint = density[..., None] + jax.nn.log_softmax(logits, axis=-1)  # (T, B, k)
        joint = jnp.where((jnp.arange(T) < seen)[:, None, None], joint, NEG)
        return jnp.full((x.shape[0], num_classes), NEG).at[:, cols].set(
            jnp.transpose(joint, (1, 0, 2)).reshape(x.shape[0], T * k))

    return table


def model_of(state: PyTree) -> PyTree:
    """What the weights exchange sends of a MIND learner: everything its table needs (weights, owner map,
    batch statistics and its pixel Gaussians)."""
    return {"params": state["params"], "batch_stats": state["batch_stats"], "owner": state["owner"],
            "inference": {"gauss_input": state["inference"]["gauss_input"]}}


def table_of(table: Callable, model: PyTree, x: np.ndarray, seen: int, batch_size: int) -> np.ndarray:
    """``table`` of ``model`` on every image of ``x`` (``evaluation.features_of``'s padded batches): ``(n, C)``."""
    return np.asarray(evaluation.features_of(table, (model["params"], model["batch_stats"], model["owner"],
                                                     model["inference"]), x, seen, batch_size))


def top_k_message(table: jax.Array, k: int) -> dict[str, jax.Array]:
    """What a probe-mode agent sends: per probe image its ``k`` best classes (uint8) and scores (float16)."""
    scores, classes = jax.lax.top_k(table, k)
    return {"classes": classes.astype(jnp.uint8), "scores": scores.astype(jnp.float16)}


def dense(message: dict[str, jax.Array], num_classes: int) -> jax.Array:
    """A message as a ``(n, C)`` table (``-inf`` where it says nothing)."""
    n = message["classes"].shape[0]
    rows = jnp.arange(n)[:, None]
    return jnp.full((n, num_classes), NEG).at[rows, message["classes"].astype(jnp.int32)].max(
        message["scores"].astype(jnp.float32))


def merge(table: jax.Array, received: jax.Array, own: jax.Array, own_table: jax.Array) -> jax.Array:
    """An agent's table after a message: its own classes from its own learner, the rest the best known."""
    return jnp.where(own, own_table, jnp.maximum(table, received))


# ---------------------------------------------------------------------------- students


def make_student_fns(cfg: CollectiveConfig, num_classes: int, norm, mesh) -> dict[str, Callable]:
    """The student's network, optimizer, train step and logits on the agents axis (``dkt.on_agents``)."""
    net = models.build("mlp", num_classes, 1, hidden=tuple(cfg.student_hidden))
    tx = optax.adam(cfg.lr)
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
            "step": dkt.on_agents(agent_step, mesh, 4, donate=(0,)),
            "logits": dkt.on_agents(logits, mesh, 2),
            "send": dkt.on_agents(lambda table, shared: send(table, cfg.top_k), mesh, 1),
            "receive": dkt.on_agents(lambda t, m, o, ot, shared: receive(t, m, o, ot), mesh, 4)}


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class World:
    """Everything static about a collective run. Build once (``setup``)."""

    cfg: CollectiveConfig
    seed: int
    scenario: Scenario  # every task, before dealing (its test splits: the test set by task)
    agent_scenarios: tuple[Scenario, ...]
    minds: tuple[mind.Mind, ...]
    tables: tuple[Callable, ...]  # per agent: make_table of its MIND
    probe_x: np.ndarray  # uint8, host (tables are computed in batches from it)
    probe_device: jax.Array  # the same images on device, replicated (the students' steps index it)
    probe_index: np.ndarray  # rows of the probe set in the dataset's training split
    test_x: np.ndarray
    test_y: np.ndarray
    joint_train: tuple[np.ndarray, np.ndarray]  # every agent's training data (the central model's)
    num_classes: int
    mesh: Any
    fns: dict[str, Callable]

    @property
    def agents(self) -> int:
        return len(self.agent_scenarios)

    @property
    def rounds(self) -> int:
        return rounds_of(list(self.agent_scenarios))


def setup(cfg: CollectiveConfig, ds: Dataset, mind_cfg: mind.MindConfig, *, seed: int = 0,
          val_fraction: float = 0.1, devices: int = 1) -> World:
    """Probe hold-out, class order, the agents' tasks and learners, the students' compiled functions.

    Args:
      cfg: the collective settings.
      ds: the dataset.
      mind_cfg: every agent's MIND settings (task inference is forced to ``gauss_input``: its scores are
        the densities the tables compare across agents).
      seed: class order, probe set, weights, batches and gossip derive from it.
      val_fraction: validation share of each task's training data (MIND's choices).
      devices: devices the agents axis is sharded over (1: vmapped).
    """
    if devices > 1 and cfg.agents % devices:
        raise ValueError(f"{cfg.agents} agents cannot be split evenly over {devices} devices")
    if ds.num_classes > 256:
        raise ValueError("uint8 class ids in the messages: at most 256 classes")
    rest, probe_x, probe_index = dkt.probe_holdout(ds, cfg.n_probe, seed)
    scenario = class_split(rest, cfg.task_count, seed=seed, val_fraction=val_fraction)
    agent_scenarios = tuple(deal(scenario, cfg.agents))
    mind_cfg = dataclasses.replace(mind_cfg, inference=dataclasses.replace(mind_cfg.inference,
                                                                           task_inference="gauss_input"))
    minds = tuple(mind.setup(mind_cfg, s) for s in agent_scenarios)
    tables = tuple(make_table(m, np.stack([t.classes for t in s.tasks]), ds.num_classes)
                   for m, s in zip(minds, agent_scenarios))
    joint = (np.concatenate([t.train.x for t in scenario.tasks]),
             np.concatenate([t.train.y_global for t in scenario.tasks]))
    mesh = dkt.make_mesh(devices)
    return World(cfg, seed, scenario, agent_scenarios, minds, tables, probe_x,
                 dkt.place(probe_x, mesh, shared=True), probe_index, ds.test_x,
                 ds.test_y.astype(np.int32), joint, ds.num_classes, mesh,
                 make_student_fns(cfg, ds.num_classes, scenario.norm, mesh))


def init_students(world: World, key: jax.Array) -> PyTree:
    """Fresh students, one per agent (keys folded in per agent), stacked on the agents axis."""
    per = [models.init(world.fns["net"], jax.random.fold_in(key, a), world.scenario.input_shape)
           for a in range(world.agents)]
    params = jax.tree.map(lambda *v: np.stack(v), *[p for p, _ in per])
    bs = jax.tree.map(lambda *v: np.stack(v), *[b for _, b in per])
    return dkt.place({"params": params, "batch_stats": bs, "opt": jax.vmap(world.fns["tx"].init)(params)},
                     world.mesh)


def init_state(world: World, key: jax.Array) -> PyTree:
    """Before round 0: fresh learners and students, empty tables, nothing sent, the central model untrained."""
    k_agents, k_students, k_joint = jax.random.split(key, 3)
    A, n, C = world.agents, len(world.probe_x), world.num_classes
    joint_p, joint_bs = models.init(world.fns["net"], k_joint, world.scenario.input_shape)
    return {
        "agents": [mind.init_state(m, jax.random.fold_in(k_agents, a)) for a, m in enumerate(world.minds)],
        "students": {v: init_students(world, jax.random.fold_in(k_students, i)) for i, v in enumerate(VARIANTS)},
        "tables": {v: dkt.place(np.full((A, n, C), -np.inf, np.float32), world.mesh) for v in VARIANTS},
        "taught": {v: np.zeros((A, C), bool) for v in VARIANTS},
        "gates": {v: np.full(A, GATES[0], np.float32) for v in VARIANTS},
        "bytes_sent": {v: np.zeros(A, np.int64) for v in VARIANTS},
        "hops": np.zeros((), np.int64),
        "joint": {"params": joint_p, "batch_stats": joint_bs},
    }


def learnt_after(world: World, r: int) -> list[int]:
    """Tasks each agent has learnt after round ``r``."""
    return [min(r + 1, s.task_count) for s in world.agent_scenarios]


def own_masks(world: World, learnt: list[int]) -> np.ndarray:
    """``[A, C]``: each agent's own classes so far."""
    return np.stack([own_mask(s, n, world.num_classes) for s, n in zip(world.agent_scenarios, learnt)])


def own_tables(world: World, agents: list, learnt: list[int], x: np.ndarray) -> np.ndarray:
    """``[A, n, C]``: every agent's own joint scores on ``x`` (``-inf`` outside its learnt classes)."""
    return np.stack([table_of(world.tables[a], model_of(agents[a]), x, learnt[a], world.cfg.eval_batch_size)
                     for a in range(world.agents)])


def exchange_probe(world: World, table: jax.Array, own: np.ndarray, own_table: np.ndarray, hop0: int,
                   trace: list | None = None) -> tuple[jax.Array, np.ndarray]:
    """``hops_per_round`` hops of top-k messages on the agents axis; returns the table and bytes sent per agent.

    ``trace`` (tests) receives every message as it crossed.
    """
    A, mesh = world.agents, world.mesh
    own_d, own_table_d = dkt.place(own, mesh), dkt.place(own_table, mesh)
    table = dkt.place(np.where(own[:, None, :], own_table, np.asarray(table)).astype(np.float32), mesh)
    sent = np.zeros(A, np.int64)
    for h in range(world.cfg.hops_per_round):
        shift = dkt.round_shift(world.cfg.topology, A, world.seed, hop0 + h)
        message = dkt.shift_agents(world.fns["send"](table, {}), shift, mesh)
        if trace is not None:
            trace.append(jax.tree.map(np.asarray, message))
        sent += dkt.tree_bytes(message) // A
        table = world.fns["receive"](table, message, own_d, own_table_d, {})
    return table, sent


def exchange_weights(world: World, table: np.ndarray, agents: list, learnt: list[int], own: np.ndarray,
                     own_table: np.ndarray, hop0: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights baseline: each hop, every agent forwards every model it holds; receivers compute their tables."""
    A = world.agents
    held = [{a: model_of(agents[a])} for a in range(A)]
    sent = np.zeros(A, np.int64)
    table = np.array(table)
    for h in range(world.cfg.hops_per_round):
        shift = dkt.round_shift(world.cfg.topology, A, world.seed, hop0 + h)
        incoming = [dict(held[(a + shift) % A]) for a in range(A)]
        for a in range(A):
            src = (a + shift) % A
            sent[src] += sum(dkt.tree_bytes(m) for m in incoming[a].values())
            for origin, model in incoming[a].items():
                if origin != a and origin not in held[a]:
                    received = table_of(world.tables[origin], model, world.probe_x, learnt[origin],
                                        world.cfg.eval_batch_size)
                    table[a] = np.maximum(table[a], received)
            held[a].update(incoming[a])
        table = np.where(own[:, None, :], own_table, table)
    return table, sent


def train_students(world: World, students: PyTree, table, taught: np.ndarray, data: dict, lam: float,
                   r: int, variant: int, epochs: int) -> PyTree:
    """``epochs`` passes over the probe set for every student at once, with batches of its own current task."""
    cfg, A, mesh = world.cfg, world.agents, world.mesh
    steps = max(1, len(world.probe_x) // cfg.batch_size)
    ctx = dkt.place({"taught": taught, "own_weight": data["own_weight"]}, mesh)
    for e in range(epochs):
        rngs = [np.random.default_rng([world.seed, 31, variant, a, r, e]) for a in range(A)]
        idx = np.stack([rng.integers(0, max(int(n), 1), (steps, cfg.batch_size)) for rng, n in zip(rngs, data["n"])])
        pidx = np.random.default_rng([world.seed, 37, variant, r, e]).permutation(len(world.probe_x))
        pidx = pidx[: steps * cfg.batch_size].reshape(steps, cfg.batch_size).astype(np.int32)
        per = {"x": data["x"], "y": data["y"], **dkt.place({"idx": idx.astype(np.int32)}, mesh)}
        shared = {"probe_x": world.probe_device, "pidx": pidx, "lam": np.float32(lam)}
        for s in range(steps):
            students, _ = world.fns["step"](students, per, table, ctx, {**shared, "s": np.int32(s)})
    return students


def current_data(world: World, r: int) -> dict:
    """Every agent's training data of its task ``r`` on the agents axis (zero rows, weight 0, if it has none)."""
    splits = [s.tasks[r].train if r < s.task_count else None for s in world.agent_scenarios]
    n_max = max(len(t.train) for t in world.scenario.tasks)
    x = np.zeros((world.agents, n_max, *world.scenario.input_shape), np.uint8)
    y = np.zeros((world.agents, n_max), np.int32)
    n = np.zeros(world.agents, np.int64)
    for a, sp in enumerate(splits):
        if sp is not None:
            n[a] = len(sp)
            x[a, : n[a]], y[a, : n[a]] = sp.x, sp.y_global
    return {**dkt.place({"x": x, "y": y}, world.mesh), "n": n, "own_weight": (n > 0).astype(np.float32)}


def train_joint(world: World, joint: PyTree, key: jax.Array) -> PyTree:
    """The central model: the student network trained on every agent's data, all classes (upper bound)."""
    cfg = world.cfg
    net, mean, std = world.fns["net"], *(jnp.asarray(v, jnp.float32) for v in world.scenario.norm)

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
        for s in range(len(y) // cfg.batch_size):
            rows = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            carry, _ = step(carry, training.Batch(x[rows], y[rows]), jax.random.fold_in(key, s), None)
    return {"params": carry[0], "batch_stats": carry[1]}


def learn_round(world: World, state: PyTree, r: int, key: jax.Array, log=None, progress: bool = False,
                trace: list | None = None) -> tuple[PyTree, dict]:
    """Round ``r``: every agent learns its task ``r``, tables are exchanged, the students distilled."""
    cfg, start = world.cfg, time.perf_counter()
    state = dict(state)
    agents = list(state["agents"])
    info: dict[str, Any] = {"task": r, "agents": []}
    for a, (m, s) in enumerate(zip(world.minds, world.agent_scenarios)):
        if r < s.task_count:
            agent_log = None if log is None else (lambda rec, a=a: log({**rec, "agent": a}))
            agents[a], ainfo = mind.learn_task(m, agents[a], r, jax.random.fold_in(key, a), log=agent_log,
                                               progress=progress)
            info["agents"].append({"agent": a, "seconds": ainfo["seconds"], "tau": ainfo["tau"]})
    state["agents"] = agents
    learnt = learnt_after(world, r)
    own = own_masks(world, learnt)
    own_table = own_tables(world, agents, learnt, world.probe_x)
    hop0 = int(state["hops"])
    data = current_data(world, r)
    lam = cfg.lam
    tables, taught, sent = dict(state["tables"]), dict(state["taught"]), dict(state["bytes_sent"])
    students, gates = dict(state["students"]), dict(state["gates"])
    for i, v in enumerate(VARIANTS):
        if lam == 0:  # the agent alone: nothing sent, nothing taught
            tables[v] = dkt.place(np.where(own[:, None, :], own_table, -np.inf).astype(np.float32), world.mesh)
            taught[v] = own
            continue
        if v == "probe":
            table, b = exchange_probe(world, tables[v], own, own_table, hop0, trace)
        else:
            table, b = exchange_weights(world, np.asarray(tables[v]), agents, learnt, own, own_table, hop0)
        tables[v] = dkt.place(np.asarray(table, np.float32), world.mesh)
        sent[v] = np.asarray(sent[v]) + b
        taught[v] = own | np.isfinite(np.asarray(table)).any(axis=1)
        students[v] = train_students(world, students[v], tables[v], taught[v], data, lam, r, i, cfg.student_epochs)
        gates[v], info.setdefault("gates", {})[v] = choose_gates(world, agents, students[v], taught[v], learnt, own)
    state.update(tables=tables, taught=taught, bytes_sent=sent, students=students, gates=gates,
                 hops=np.asarray(hop0 + (0 if lam == 0 else cfg.hops_per_round), np.int64))
    if r == 0:
        state["joint"] = train_joint(world, state["joint"], jax.random.fold_in(key, 10_000))
    info.update(hops=int(state["hops"]), bytes_sent={v: np.asarray(sent[v]).tolist() for v in VARIANTS},
                taught=[int(t.sum()) for t in taught["probe"]], train_seconds=time.perf_counter() - start)
    return state, info


# ---------------------------------------------------------------------------- evaluation


def student_view(world: World, students: PyTree, taught: np.ndarray, own: np.ndarray, x: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What every agent's student says of ``x``: own-class mass, best other class, best class (each ``[A, n]``)."""
    z = np.concatenate([np.asarray(world.fns["logits"](students, dkt.place(taught, world.mesh), xb))[:, valid]
                        for xb, _, valid in evaluation.pad_batches(x, np.zeros(len(x), np.int32),
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


def choose_gates(world: World, agents: list, students: PyTree, taught: np.ndarray, learnt: list[int],
                 own: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Each agent's gate, on its own tasks' validation splits (never test): the largest of ``GATES`` whose
    own-class accuracy is within ``gate_tolerance`` of the agent alone's. Returns ``(gates [A], evidence)``."""
    gates, evidence = np.full(world.agents, GATES[-1], np.float32), []
    vals = [[t.val for t in s.tasks[:n]] for s, n in zip(world.agent_scenarios, learnt)]
    x = np.concatenate([v.x for per in vals for v in per])
    y = np.concatenate([v.y_global for per in vals for v in per])
    owner = np.concatenate([np.full(len(v.y), a) for a, per in enumerate(vals) for v in per])
    own_mass, other, _ = student_view(world, students, taught, own, x)
    alone = np.argmax(own_tables(world, agents, learnt, x), axis=-1)
    knows = (taught & ~own).any(-1)
    for a in range(world.agents):
        rows = owner == a
        base = float(np.mean(alone[a][rows] == y[rows]))
        acc = {g: float(np.mean(gated(alone[a:a + 1, rows], own_mass[a:a + 1, rows], other[a:a + 1, rows], [g],
                                      knows[a:a + 1])[0] == y[rows])) for g in GATES}
        gates[a] = next((g for g in GATES if acc[g] >= base - world.cfg.gate_tolerance), GATES[-1])
        evidence.append({"alone": base, "gated": {str(g): v for g, v in acc.items()}, "gate": float(gates[a])})
    return gates, evidence


def predictions(world: World, state: PyTree, learnt: list[int], x: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every agent's predicted class of every image of ``x`` (default: the test set) ``[A, n]`` per rule, and the
    central model's ``[n]``.

    ``alone``: the agent's own learner among its own classes. ``collective`` / ``weights``: ``gated`` by the
    student of that exchange at the agent's gate (``choose_gates``). ``student``: the probe-exchange student's
    best class of all it was taught.
    """
    x = world.test_x if x is None else x
    own = own_masks(world, learnt)
    alone = np.argmax(own_tables(world, state["agents"], learnt, x), axis=-1)
    out = {"alone": alone}
    for v in VARIANTS:
        taught = np.asarray(state["taught"][v])
        own_mass, other, best = student_view(world, state["students"][v], taught, own, x)
        out[RULE_OF[v]] = gated(alone, own_mass, other, state["gates"][v], (taught & ~own).any(-1))
        if v == "probe":
            out["student"] = np.where(taught.any(-1)[:, None], best, alone)
    joint = world.fns["net"].apply(state["joint"], batching.to_float(x, *(
        jnp.asarray(v, jnp.float32) for v in world.scenario.norm)), 0, train=False)
    out["joint"] = np.asarray(jnp.argmax(joint, -1))
    return out


def evaluate(world: World, state: PyTree, seen: int) -> dict[str, np.ndarray]:
    """Per rule ``[A, rounds]``: each agent's accuracy on the test images of every round's classes."""
    pred = predictions(world, state, learnt_after(world, seen - 1))
    cols = [np.isin(world.test_y, round_classes(list(world.agent_scenarios), r)) for r in range(world.rounds)]
    return {rule: np.stack([[np.mean(pred[rule][a][c] == world.test_y[c]) for c in cols]
                            for a in range(world.agents)]) for rule in RULES}


def class_accuracies(world: World, pred: np.ndarray, own: np.ndarray, y: np.ndarray | None = None
                     ) -> dict[str, float]:
    """One agent's accuracy on the images (default: the test set) of its own classes, of the others', and of all."""
    y = world.test_y if y is None else y
    right = pred == y
    mine = own[y]
    return {"own_classes": float(right[mine].mean()), "other_classes": float(right[~mine].mean()),
            "all_classes": float(right.mean())}


def weights_bytes_per_hop(state: PyTree) -> list[int]:
    """Bytes of each agent's parameters (float32): the least a weights exchange sends per hop."""
    return [dkt.tree_bytes(a["params"]) for a in state["agents"]]


def collective_report(world: World, state: PyTree, rounds_done: int | None = None) -> dict:
    """results.json's ``collective`` block after ``rounds_done`` rounds (default all): per agent own / other /
    all-class accuracy and bytes sent, per variant; the central model; the least weights exchange's bytes."""
    rounds_done = world.rounds if rounds_done is None else rounds_done
    if rounds_done == 0:
        return {"collective": None}
    learnt = learnt_after(world, rounds_done - 1)
    own = own_masks(world, learnt)
    pred = predictions(world, state, learnt)
    val = [t.val for t in world.scenario.tasks]  # every task's validation split: the experimenter's choices
    val_x, val_y = np.concatenate([v.x for v in val]), np.concatenate([v.y_global for v in val]).astype(np.int32)
    val_pred = predictions(world, state, learnt, val_x)
    hops = int(state["hops"])

    def agents_of(rule: str, variant: str | None) -> list[dict]:
        return [{"agent": a, **class_accuracies(world, pred[rule][a], own[a]),
                 "val_all_classes": class_accuracies(world, val_pred[rule][a], own[a], val_y)["all_classes"],
                 "bytes_sent": int(np.asarray(state["bytes_sent"][variant])[a]) if variant else 0}
                for a in range(world.agents)]

    return {"collective": {
        "agents": agents_of("collective", "probe"),
        "alone": agents_of("alone", None),
        "weights_exchange": agents_of("weights", "weights"),
        "student": agents_of("student", None),
        "joint": {"all_classes": float(np.mean(pred["joint"] == world.test_y)),
                  "val_all_classes": float(np.mean(val_pred["joint"] == val_y)),
                  "own_classes": [class_accuracies(world, pred["joint"], own[a])["own_classes"]
                                  for a in range(world.agents)]},
        "weights_exchange_bytes": [hops * b for b in weights_bytes_per_hop(state)],
        "round_test_images": [int(np.isin(world.test_y, round_classes(list(world.agent_scenarios), r)).sum())
                              for r in range(world.rounds)],
        "hops": hops, "top_k": world.cfg.top_k, "n_probe": len(world.probe_x),
        "classes": [[t.classes for t in s.tasks] for s in world.agent_scenarios],
        "probe_rows": world.probe_index,
    }}


def learner(world: World) -> Learner:
    """The collective run as a ``Learner``: one loop task per round, agents on the rows' leading axis."""
    return Learner(
        name="collective", rules=("collective", "alone") + tuple(r for r in RULES if r not in ("collective", "alone")),
        lead_axes=("agent",),
        tasks=tuple(f"round{r}" for r in range(world.rounds)),
        classes=tuple(tuple(int(c) for c in round_classes(list(world.agent_scenarios), r))
                      for r in range(world.rounds)),
        init_state=lambda key: init_state(world, key),
        learn_task=lambda state, t, key, log=None, progress=False: learn_round(world, state, t, key, log, progress),
        evaluate=lambda state, seen: evaluate(world, state, seen),
        param_counts=lambda state: {"learner_per_agent": [models.param_count(a["params"]) for a in state["agents"]],
                                    "student_per_agent": models.param_count(
                                        jax.tree.map(lambda v: v[0], state["students"]["probe"]["params"]))},
        report=lambda state, infos: collective_report(world, state, len(infos)),
        describe=lambda info: f"sent {info['bytes_sent']['probe'][0]:,} B (agent 0)", mesh=world.mesh)
