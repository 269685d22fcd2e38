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

All students and tables live on a leading agents axis (``agents.on_agents``:
vmapped, or ``shard_map`` over a mesh) and move between agents only through
``agents.shift_agents``; the MIND learners are per agent (their task counts differ).
The tables, their messages and exchanges are ``methods.collective_tables``; the
students, the central model and the gates ``methods.collective_students``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import models
from modkd_jax.agents import (TOPOLOGIES, check_split, class_mask, make_mesh, place, probe_holdout, stack_splits,
                              tree_bytes)
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, class_split
from modkd_jax.data.sources import Dataset
from modkd_jax.learner import Learner
from modkd_jax.methods import mind
from modkd_jax.methods.collective_students import (GATES, choose_gates, gate_inputs, gated, init_students,
                                                   make_student_fns, student_view, train_joint, train_students)
from modkd_jax.methods.collective_tables import exchange_probe, exchange_weights, make_table, own_tables
from modkd_jax.methods.kit import norm_of

PyTree = Any
VARIANTS = ("probe", "weights")  # what travels: top-k table entries, or the learners' models
RULES = ("collective", "weights", "alone", "student")  # per agent: accuracy on each round's classes
RULE_OF = {"probe": "collective", "weights": "weights"}


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
                  (self.topology in TOPOLOGIES, f"unknown topology {self.topology!r}; expected one of "
                                                    f"{TOPOLOGIES}"),
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
          val_fraction: float = 0.1, agent_devices: int = 1) -> World:
    """Probe hold-out, class order, the agents' tasks and learners, the students' compiled functions.

    Args:
      cfg: the collective settings.
      ds: the dataset.
      mind_cfg: every agent's MIND settings (task inference is forced to ``gauss_input``: its scores are
        the densities the tables compare across agents).
      seed: class order, probe set, weights, batches and gossip derive from it.
      val_fraction: validation share of each task's training data (MIND's choices).
      agent_devices: devices the agents axis is sharded over (1: vmapped).
    """
    check_split(cfg.agents, agent_devices)
    if ds.num_classes > 256:
        raise ValueError("uint8 class ids in the messages: at most 256 classes")
    rest, probe_x, probe_index = probe_holdout(ds, cfg.n_probe, seed)
    scenario = class_split(rest, cfg.task_count, seed=seed, val_fraction=val_fraction)
    agent_scenarios = tuple(deal(scenario, cfg.agents))
    mind_cfg = dataclasses.replace(mind_cfg, inference=dataclasses.replace(mind_cfg.inference,
                                                                           task_inference="gauss_input"))
    minds = tuple(mind.setup(mind_cfg, s) for s in agent_scenarios)
    tables = tuple(make_table(m, np.stack([t.classes for t in s.tasks]), ds.num_classes)
                   for m, s in zip(minds, agent_scenarios))
    joint = (np.concatenate([t.train.x for t in scenario.tasks]),
             np.concatenate([t.train.y_global for t in scenario.tasks]))
    mesh = make_mesh(agent_devices)
    return World(cfg, seed, scenario, agent_scenarios, minds, tables, probe_x,
                 place(probe_x, mesh, shared=True), probe_index, ds.test_x,
                 ds.test_y.astype(np.int32), joint, ds.num_classes, mesh,
                 make_student_fns(cfg, ds.num_classes, scenario.norm, mesh))


def init_state(world: World, key: jax.Array) -> PyTree:
    """Before round 0: fresh learners and students, empty tables, nothing sent, the central model untrained."""
    k_agents, k_students, k_joint = jax.random.split(key, 3)
    A, n, C = world.agents, len(world.probe_x), world.num_classes
    joint_p, joint_bs = models.init(world.fns["net"], k_joint, world.scenario.input_shape)
    return {
        "agents": [mind.init_state(m, jax.random.fold_in(k_agents, a)) for a, m in enumerate(world.minds)],
        "students": {v: init_students(world, jax.random.fold_in(k_students, i)) for i, v in enumerate(VARIANTS)},
        "tables": {v: place(np.full((A, n, C), -np.inf, np.float32), world.mesh) for v in VARIANTS},
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
    return np.stack([class_mask(s, n, world.num_classes) for s, n in zip(world.agent_scenarios, learnt)])


def current_data(world: World, r: int) -> dict:
    """Every agent's training data of its task ``r`` on the agents axis (zero rows, weight 0, if it has none)."""
    splits = [s.tasks[r].train if r < s.task_count else None for s in world.agent_scenarios]
    x, y, n = stack_splits(splits, max(len(t.train) for t in world.scenario.tasks))
    return {**place({"x": x, "y": y}, world.mesh), "n": n, "own_weight": (n > 0).astype(np.float32)}


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
    val = gate_inputs(world, agents, learnt) if lam != 0 else None  # shared by both exchanges' gates
    for i, v in enumerate(VARIANTS):
        if lam == 0:  # the agent alone: nothing sent, nothing taught
            tables[v] = place(np.where(own[:, None, :], own_table, -np.inf).astype(np.float32), world.mesh)
            taught[v] = own
            continue
        if v == "probe":
            table, b = exchange_probe(world, tables[v], own, own_table, hop0, trace)
        else:
            table, b = exchange_weights(world, np.asarray(tables[v]), agents, own, own_table, hop0)
        tables[v] = place(np.asarray(table, np.float32), world.mesh)
        sent[v] = np.asarray(sent[v]) + b
        taught[v] = own | np.isfinite(np.asarray(table)).any(axis=1)
        students[v] = train_students(world, students[v], tables[v], taught[v], data, lam, r, i, cfg.student_epochs)
        gates[v], info.setdefault("gates", {})[v] = choose_gates(world, students[v], taught[v], own, val)
    state.update(tables=tables, taught=taught, bytes_sent=sent, students=students, gates=gates,
                 hops=np.asarray(hop0 + (0 if lam == 0 else cfg.hops_per_round), np.int64))
    if r == 0:
        state["joint"] = train_joint(world, state["joint"], jax.random.fold_in(key, 10_000))
    info.update(hops=int(state["hops"]), bytes_sent={v: np.asarray(sent[v]).tolist() for v in VARIANTS},
                taught=[int(t.sum()) for t in taught["probe"]], train_seconds=time.perf_counter() - start)
    return state, info


# ---------------------------------------------------------------------------- evaluation


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
    joint = world.fns["net"].apply(state["joint"], batching.to_float(x, *norm_of(world.scenario, jnp.float32)), 0,
                                   train=False)
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
    return [tree_bytes(a["params"]) for a in state["agents"]]


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
