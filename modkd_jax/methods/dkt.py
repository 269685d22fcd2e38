"""DKT: distributed knowledge transfer between continual learners, decentralized.

Every learner is a ``TwoHead`` network: a shared feature extractor, a **CL head**
trained by cross-entropy on the learner's own current experience, and a
**student head** trained only to match a teacher's soft targets; the loss is
``L_cl + lam * L_kd`` (KD: ``T^2 * KL`` at temperature ``T``, or MSE between
softened probabilities). Both heads have one row per *global* class, so two
learners with different class orders speak the same output language.

Masking. The CL head sees the classes its learner has met so far (others get
``losses.MASK_VALUE``) in training and class-incremental evaluation. A
teacher's soft targets are its CL-head logits masked the same way; the student
head is trained on that support and evaluated class-incrementally over every
class any teacher has taught it ("taught"). Task-incremental accuracy takes the
argmax inside the task's own classes.

Agents. ``N`` learners are one pytree with a leading ``agents`` axis (params,
batch stats, optimizer state, inbox, exchange progress). The train step
(``training.make_step`` over ``make_loss`` and a ``Context``) is ``vmap``-ed over
that axis and jitted; with a mesh the *same* function runs inside ``shard_map``
over the ``agents`` mesh axis, with no communication. The only cross-agent
traffic is ``shift_agents``: ``jnp.roll`` when vmapped, ``jax.lax.ppermute``
inside ``shard_map`` when sharded (equal, tested).

Exchange modes (what travels, counted in bytes):
- ``probe``: each agent sends its CL-head logits on a shared unlabelled probe
  set, ``(n_probe, classes)`` float32 and nothing else. The probe images are
  drawn once (from the seed) out of the *training* pool and removed from every
  agent's training data; the test set is untouched.
- ``weights``: each agent sends its parameters, batch statistics and seen-class
  mask; the receiver runs the copy as teacher on its own batches.

``learner`` wraps a run as a ``modkd_jax.learner.Learner`` (``lead_axes=("agent",)``)
for ``modkd_jax.loop.run``; keys derive from the seed alone (``learner_key``).
The agents axis (placement, ``on_agents``, ``shift_agents``) is ``modkd_jax.agents``;
the per-agent step, loss and counts are ``methods.dkt_step``; class orders and
what each epoch feeds the step are ``methods.dkt_data``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from modkd_jax import evaluation, losses, parallel, training
from modkd_jax.agents import (TOPOLOGIES, check_split, class_mask, make_mesh, place, probe_holdout, round_shift,
                              shift_agents, stack_learners, tree_bytes)
from modkd_jax.data.scenarios import Scenario, Split
from modkd_jax.data.sources import Dataset
from modkd_jax.epochs import run_epoch
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.methods.dkt_data import (agent_scenarios, epoch_inputs, epoch_keys, epoch_rngs, experience_data,
                                        joint_split, learner_key, order_seed)
from modkd_jax.methods.dkt_step import make_functions
from modkd_jax.methods.kit import norm_of
from modkd_jax.models import two_head

PyTree = Any
EXPERIMENTS = ("joint_teacher", "continual_teacher", "agents")
MODES = ("probe", "weights")
KD_LOSSES = ("kl", "mse")
RULES = ("cl_cil", "student_cil", "cl_til", "student_til")  # accuracy of both heads of every agent
TEACHER_RULES = ("teacher_til", "teacher_cil")  # the teacher's CL head (teacher experiments, one agent)


@dataclasses.dataclass(frozen=True)
class DKTConfig:
    """Hyperparameters of a DKT run (defaults: MNIST-sized MLPs; ``PRESETS`` per dataset)."""

    experiment: str = "agents"  # one of EXPERIMENTS
    agents: int = 2  # learners in the agents experiment (>= 2); 1 (the student) otherwise
    backbone: str = "mlp"
    hidden: tuple[int, ...] = (400, 400)
    epochs: int = 2  # per experience, for every learner
    teacher_epochs: int = 2  # joint teacher (whole stream) or continual teacher (per experience)
    batch_size: int = 128
    probe_batch_size: int | None = None  # None: batch_size
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    lam: float = 1.0  # weight of the distillation loss
    kd: str = "kl"  # "kl" (T^2 KL) | "mse" (soft targets)
    temperature: float = 2.0
    exchange: str = "probe"
    topology: str = "ring"  # ring: agent a learns from a+1; gossip: from a+s, s random per round
    exchange_every: int = 1  # epochs between exchange rounds (agents experiment)
    alone: bool = False  # no exchange at all: the "same agent trained alone" baseline
    n_probe: int = 1000
    crop_flip: bool = False
    eval_batch_size: int = 1000

    def __post_init__(self):
        if self.probe_batch_size is None:
            object.__setattr__(self, "probe_batch_size", self.batch_size)
        if self.experiment != "agents":
            object.__setattr__(self, "agents", 1)  # one student, one teacher
        checks = [(self.experiment in EXPERIMENTS, f"unknown experiment {self.experiment!r}; expected one of "
                                                   f"{EXPERIMENTS}"),
                  (self.agents >= 2 or self.experiment != "agents",
                   f"the agents experiment needs at least 2 agents, got {self.agents}"),
                  (self.optimizer in training.OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; expected adam or sgd"),
                  (self.kd in KD_LOSSES, f"unknown kd loss {self.kd!r}; expected one of {KD_LOSSES}"),
                  (self.exchange in MODES, f"unknown exchange {self.exchange!r}; expected one of {MODES}"),
                  (self.topology in TOPOLOGIES, f"unknown topology {self.topology!r}; expected one of {TOPOLOGIES}"),
                  (self.backbone in two_head.BACKBONES, f"unknown backbone {self.backbone!r}; expected one of "
                                                        f"{two_head.BACKBONES}"),
                  (min(self.epochs, self.teacher_epochs, self.batch_size, self.probe_batch_size,
                       self.exchange_every, self.n_probe, self.eval_batch_size) >= 1,
                   "epochs, teacher_epochs, batch sizes, exchange_every and n_probe must be at least 1"),
                  (self.lam >= 0 and self.temperature > 0, "lam must be >= 0 and temperature > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# Per-dataset presets: DKTConfig fields plus the scenario's task count and validation share. Small MLPs on
# the 28x28 / 8x8 sets, ResNet-32 features on CIFAR. Adam at 1e-4 on (Fashion-)MNIST: at 1e-3 it pushes the
# rows of old classes down at full step size and the CL head's TIL accuracy falls to ~50% after 5 experiences.
_SCENARIO = dict(task_count=5, val_fraction=0.0)
_CIFAR = dict(_SCENARIO, backbone="resnet32", hidden=(), epochs=10, teacher_epochs=10, n_probe=2000, crop_flip=True)
PRESETS = {
    "mnist": dict(_SCENARIO, lr=1e-4),
    "fashion_mnist": dict(_SCENARIO, lr=1e-4),
    "digits": dict(_SCENARIO, hidden=(64, 64), epochs=5, teacher_epochs=5, batch_size=32, lr=2e-3, n_probe=200),
    "cifar10": _CIFAR,
    "cifar100": dict(_CIFAR, task_count=10),
}


def mode_name(cfg: DKTConfig) -> str:
    """``alone`` or the exchange mode."""
    return "alone" if cfg.alone or cfg.lam == 0 else cfg.exchange


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class World:
    """Everything static about a run: data, networks, compiled per-agent functions. Build once."""

    cfg: DKTConfig
    seed: int
    scenarios: tuple[Scenario, ...]  # one per learner (agents), or the student's alone
    probe_x: jax.Array  # uint8 on device (replicated), held out of every learner's training data
    probe_index: np.ndarray  # its rows in the dataset's original training split
    test: Split  # the whole test set (global labels)
    num_classes: int
    model: two_head.TwoHead
    mesh: Mesh | None
    fns: dict[str, Callable]

    @property
    def experiment(self) -> str:
        return self.cfg.experiment

    @property
    def agents(self) -> int:
        return len(self.scenarios)

    @property
    def task_count(self) -> int:
        return self.scenarios[0].task_count

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.scenarios[0].input_shape


def setup(cfg: DKTConfig, ds: Dataset, task_count: int, *, seed: int = 0, agent_devices: int = 1,
          val_fraction: float = 0.0) -> World:
    """Data (probe hold-out, one class order per learner), network and compiled functions of a run.

    Args:
      cfg: the run's hyperparameters (experiment and agent count included).
      ds: the dataset.
      task_count: experiences per learner.
      seed: class orders, probe set, initial weights, batches and gossip all derive from it.
      agent_devices: devices the agents axis is sharded over (1: vmapped on one device).
      val_fraction: validation share held out of each task's training data.
    """
    devices = agent_devices if cfg.experiment == "agents" else 1
    check_split(cfg.agents, devices)
    rest, probe_x, probe_index = probe_holdout(ds, cfg.n_probe, seed)
    scenarios = tuple(agent_scenarios(rest, task_count, cfg.agents, seed, val_fraction))
    model = two_head.TwoHead(ds.num_classes, cfg.backbone, tuple(cfg.hidden))
    mesh = make_mesh(devices)
    mean, std = norm_of(scenarios[0])
    probe_x = place(probe_x, mesh, shared=True)  # on device once, not copied into every step
    return World(cfg, seed, scenarios, probe_x, probe_index, Split(ds.test_x, ds.test_y, ds.test_y),
                 ds.num_classes, model, mesh, make_functions(cfg, model, mean, std, mesh))


def init_learners(world: World, keys: list[jax.Array]) -> PyTree:
    """Fresh learners (params, batch stats, optimizer state), one per key, stacked on the agents axis."""
    return stack_learners(lambda k: two_head.init(world.model, k, world.input_shape), keys, world.fns["tx"])


def empty_inbox(world: World, learners: PyTree) -> PyTree:
    """An inbox with nothing received: zero message of the right shape, no teacher, nothing taught."""
    A = jax.tree.leaves(learners)[0].shape[0]
    seen = np.zeros((A, world.num_classes), bool)
    shape = jax.eval_shape(world.fns["message"], learners, seen, {"probe_x": world.probe_x})
    return {"message": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shape),
            "has_teacher": np.zeros(A, np.float32), "taught": seen}


def init_state(world: World) -> PyTree:
    """The run's state before any experience: learners, inbox, exchange progress, (teacher runs) the teacher.

    ``progress`` holds the exchange rounds so far and the bytes each agent sent
    (int64 numpy, restored exactly by the loop's checkpoint).
    """
    learners = init_learners(world, [learner_key(world, 0, a) for a in range(world.agents)])
    state = {"learners": place(learners, world.mesh), "inbox": place(empty_inbox(world, learners), world.mesh),
             "progress": {"rounds": np.zeros((), np.int64), "bytes_sent": np.zeros(world.agents, np.int64)}}
    if world.experiment != "agents":
        teacher = init_learners(world, [learner_key(world, 1, 0)])
        state["teacher"] = place({"learners": teacher, "inbox": empty_inbox(world, teacher),
                                  "seen": np.zeros((1, world.num_classes), bool)}, None)
    return state


def train_epoch(world: World, learners: PyTree, inbox: PyTree, data: dict, lam: float, rngs, keys,
                mesh: Mesh | None) -> tuple[PyTree, dict[str, np.ndarray]]:
    """One epoch for every agent at once; returns the learners and per-agent mean metrics ``{name: [A]}``."""
    per_agent, shared, steps = epoch_inputs(world, data, lam, rngs, keys, mesh)

    def step(learners, s):
        return world.fns["step"](learners, inbox["message"], inbox["has_teacher"], per_agent, {**shared, "s": s})

    learners, means, _ = run_epoch(step, learners, ((np.int32(s),) for s in range(steps)))
    return learners, means


def support_of(world: World, message: PyTree) -> np.ndarray:
    """``[A, C]`` classes each message's teacher knows (the classes its soft targets cover)."""
    if world.cfg.exchange == "probe":
        return parallel.to_host(message["logits"][:, 0, :] > losses.MASK_VALUE / 2)
    return parallel.to_host(message["seen"])


def receive(world: World, inbox: PyTree, message: PyTree, mesh: Mesh | None) -> PyTree:
    """The inbox after ``message`` (already routed to its receivers) arrives."""
    taught = parallel.to_host(inbox["taught"]) | support_of(world, message)
    A = taught.shape[0]
    return {"message": message, **place({"has_teacher": np.ones(A, np.float32), "taught": taught}, mesh)}


def send(world: World, learners: PyTree, seen: np.ndarray, mesh: Mesh | None) -> PyTree:
    """Every agent's outgoing message (agents axis)."""
    return world.fns["message"](learners, place(seen, mesh), {"probe_x": world.probe_x})


def _fit(world: World, learners, inbox, data, *, epochs, lam, role, t, mesh, log, tag, after_epoch=None):
    """``epochs`` epochs of one experience; ``after_epoch(epoch, learners, inbox) -> inbox`` runs between them."""
    A = jax.tree.leaves(learners)[0].shape[0]
    for e in range(epochs):
        learners, m = train_epoch(world, learners, inbox, data, lam, epoch_rngs(world, role, A, t, e),
                                  epoch_keys(world, role, A, t, e), mesh)
        if log is not None:
            log({"task": t, "phase": tag, "epoch": e, **{k: v.tolist() for k, v in m.items()}})
        if after_epoch is not None:
            inbox = after_epoch(e, learners, inbox)
    return learners, inbox


def learn_task(world: World, state: PyTree, t: int, log: Callable[[dict], None] | None = None
               ) -> tuple[PyTree, dict]:
    """Train experience ``t`` of every learner (and the teacher); returns the new state and the task's info."""
    cfg, start = world.cfg, time.perf_counter()
    A, C, T = world.agents, world.num_classes, world.task_count
    prog = {"rounds": int(state["progress"]["rounds"]), "bytes_sent": np.array(state["progress"]["bytes_sent"])}
    seen = np.stack([class_mask(s, t + 1, C) for s in world.scenarios])
    data = experience_data(world, [s.tasks[t].train for s in world.scenarios], seen, world.mesh)
    learners, inbox = state["learners"], state["inbox"]
    state = dict(state)
    lam = 0.0 if cfg.alone else cfg.lam

    def deliver(message, shift, epoch):
        per_agent = tree_bytes(message) // A
        prog["bytes_sent"] += per_agent
        prog["rounds"] += 1
        if log is not None:
            log({"task": t, "phase": "exchange", "epoch": epoch, "round": prog["rounds"], "shift": shift,
                 "bytes_per_agent": per_agent})

    if world.experiment == "agents":
        def after_epoch(e, learners, inbox):
            g = t * cfg.epochs + e  # exchange every `exchange_every` epochs, never after the very last
            if cfg.alone or (g + 1) % cfg.exchange_every or (t == T - 1 and e == cfg.epochs - 1):
                return inbox
            shift = round_shift(cfg.topology, A, world.seed, prog["rounds"])
            message = shift_agents(send(world, learners, seen, world.mesh), shift, world.mesh)
            deliver(message, shift, e)
            return receive(world, inbox, message, world.mesh)
    else:
        after_epoch = None
        teacher = state["teacher"]
        if world.experiment == "continual_teacher" or t == 0:  # refresh the teacher
            if world.experiment == "joint_teacher":  # trained once on every class of the stream
                t_split, t_seen = joint_split(world.scenarios[0]), np.ones((1, C), bool)
            else:  # a fine-tuning continual learner on the student's stream, one experience ahead
                t_split, t_seen = world.scenarios[0].tasks[t].train, seen
            t_data = experience_data(world, [t_split], t_seen, None)
            t_learners, _ = _fit(world, teacher["learners"], teacher["inbox"], t_data, epochs=cfg.teacher_epochs,
                                 lam=0.0, role=1, t=t, mesh=None, log=log, tag="teacher")
            state["teacher"] = {"learners": t_learners, "inbox": teacher["inbox"], "seen": place(t_seen, None)}
            if not cfg.alone:
                message = send(world, t_learners, t_seen, None)
                deliver(message, 0, -1)
                inbox = receive(world, inbox, message, None)
    learners, inbox = _fit(world, learners, inbox, data, epochs=cfg.epochs, lam=lam, role=0, t=t, mesh=world.mesh,
                           log=log, tag="train", after_epoch=after_epoch)
    state["learners"], state["inbox"] = jax.block_until_ready((learners, inbox))
    state["progress"] = {"rounds": np.asarray(prog["rounds"], np.int64), "bytes_sent": prog["bytes_sent"]}
    return state, {"task": t, "rounds": prog["rounds"], "bytes_sent": prog["bytes_sent"].tolist(),
                   "train_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------- evaluation


def head_rows(world: World, learners: PyTree, classes: np.ndarray, seen: np.ndarray, taught: np.ndarray,
              mesh: Mesh | None) -> dict[str, np.ndarray]:
    """Test accuracies ``[A, T]`` of both heads (TIL, CIL) of every learner (``evaluation.counts_per_split``).

    ``classes`` ``[A, T, k]`` is each learner's class order; class-incremental rules choose among
    ``seen`` (CL head) or ``taught`` (student head), NaN where that mask is empty.
    """
    args = (learners, *place((classes.astype(np.int32), seen, taught), mesh))
    [(c, _)] = evaluation.counts_per_split(world.fns["counts"], args, [world.test], 0, world.cfg.eval_batch_size)
    n = c.pop("rows")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {rule: np.asarray(v, float) / n for rule, v in c.items()}
    out["cl_cil"][~seen.any(-1)] = np.nan
    out["student_cil"][~taught.any(-1)] = np.nan
    out["student_til"][~taught.any(-1)] = np.nan
    return out


def classes_of(scenarios) -> np.ndarray:
    """``[A, T, k]`` class order of each learner's scenario."""
    return np.stack([np.stack([task.classes for task in s.tasks]) for s in scenarios])


def evaluate(world: World, state: PyTree, seen: int) -> dict[str, np.ndarray]:
    """Rows ``[A, T]`` after ``seen`` experiences for both heads of every learner, and ``[1, T]`` of the teacher.

    The student head is NaN while its agent has been taught nothing.
    """
    masks = np.stack([class_mask(s, seen, world.num_classes) for s in world.scenarios])
    out = head_rows(world, state["learners"], classes_of(world.scenarios), masks,
                    parallel.to_host(state["inbox"]["taught"]), world.mesh)
    if "teacher" in state:
        t_seen = np.asarray(state["teacher"]["seen"])
        rows = head_rows(world, state["teacher"]["learners"], classes_of(world.scenarios[:1]), t_seen,
                         np.zeros_like(t_seen), None)
        out.update({rule: rows[rule.replace("teacher", "cl")] for rule in TEACHER_RULES})
    return out


# ---------------------------------------------------------------------------- the Learner


def params_per_agent(state: PyTree) -> int:
    """Parameters of one learner (the agents axis dropped)."""
    return int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(state["learners"]["params"])))


def param_counts(state: PyTree) -> dict:
    """Parameters per agent (and of the teacher)."""
    out = {"per_agent": params_per_agent(state)}
    if "teacher" in state:
        out["teacher"] = params_per_agent(state["teacher"])
    return out


def report(world: World, state: PyTree, infos: list) -> dict:
    """DKT's part of results.json: experiment, exchange totals, probe set, each agent's class order."""
    del infos
    cfg, prog = world.cfg, state["progress"]
    rounds, sent = int(prog["rounds"]), [int(b) for b in prog["bytes_sent"]]
    return {
        "experiment": cfg.experiment, "mode": mode_name(cfg),
        "exchange": {"mode": cfg.exchange, "topology": cfg.topology, "rounds": rounds,
                     "bytes_per_agent_per_round": sent[0] // rounds if rounds else 0,
                     "bytes_sent_per_agent": sent, "bytes_total": sum(sent)},
        "probe": {"n_probe": len(world.probe_x), "source": "held out of the training split (test untouched)",
                  "rows": world.probe_index},
        "agents": [{"agent": a, "class_order_seed": order_seed(world.seed, a), "tasks": [t.name for t in s.tasks],
                    "classes": [t.classes for t in s.tasks]} for a, s in enumerate(world.scenarios)],
        "params_per_agent": params_per_agent(state),
    }


def describe(info: dict) -> str:
    """The per-task line's extra: bytes sent so far by agent 0."""
    return f"sent {info['bytes_sent'][0]:,} B/agent"


def learner(world: World) -> Learner:
    """DKT as a ``Learner``: agents on the leading axis of state and accuracy rows (``lead_axes=("agent",)``).

    Keys derive from ``world.seed`` (``learner_key``, ``epoch_keys``), not from the loop's keys,
    so a run's numbers depend on the seed only.
    """
    return Learner(
        name="dkt", rules=RULES + (TEACHER_RULES if world.experiment != "agents" else ()), lead_axes=("agent",),
        init_state=lambda key: init_state(world),
        learn_task=lambda state, t, key, log=None, progress=False: learn_task(world, state, t, log),
        evaluate=lambda state, seen: evaluate(world, state, seen),
        param_counts=param_counts,
        report=lambda state, infos: report(world, state, infos),
        describe=describe, **scenario_fields(world.scenarios[0]))
