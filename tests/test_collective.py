"""Collective distillation: what crosses the exchange, probe hold-out, relay, lambda 0 == alone, sharded == vmapped,
the CLI on digits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dkt as dkt_cli
from modkd_jax import agents, data
from modkd_jax.methods import collective, mind
from modkd_jax.methods import collective_tables as tables

REPO = Path(__file__).resolve().parents[1]
TINY = dict(agents=3, task_count=5, n_probe=120, student_hidden=(64,), student_epochs=30, joint_epochs=2,
            batch_size=32, eval_batch_size=400)
MIND = mind.preset_config("digits", epochs=2, distill_epochs=2, hidden=(32, 32))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _rounds(world, trace=None):
    """Every round of ``world``; returns the final state and the infos."""
    state, infos = collective.init_state(world, jax.random.key(0)), []
    for r in range(world.rounds):
        state, info = collective.learn_round(world, state, r, jax.random.fold_in(jax.random.key(1), r), trace=trace)
        infos.append(info)
    return state, infos


@pytest.fixture(scope="module")
def traced(digits):
    world = collective.setup(collective.CollectiveConfig(**TINY), digits, MIND, seed=0)
    trace = []
    state, infos = _rounds(world, trace)
    return world, state, infos, trace


def test_tasks_are_dealt_and_the_probe_set_is_disjoint_from_every_agent(digits, traced):
    world = traced[0]
    assert [s.task_count for s in world.agent_scenarios] == [2, 2, 1] and world.rounds == 2
    classes = [c for s in world.agent_scenarios for t in s.tasks for c in t.classes]
    assert sorted(classes) == list(range(10))  # every class belongs to exactly one agent
    assert len(world.probe_x) == 120 and len(np.unique(world.probe_index)) == 120
    rest = np.setdiff1d(np.arange(len(digits.train_y)), world.probe_index)
    probe_only = {r.tobytes() for r in world.probe_x} - {r.tobytes() for r in digits.train_x[rest]}
    assert len(probe_only) > 100  # (exact duplicate images of the dataset aside)
    for s in world.agent_scenarios:
        rows = {r.tobytes() for t in s.tasks for split in (t.train, t.val) for r in split.x}
        assert not probe_only & rows
    joint = {r.tobytes() for r in world.joint_train[0]}
    assert not probe_only & joint


def test_only_top_k_scores_of_the_probe_images_cross(traced):
    world, state, _, trace = traced
    A, n, k = 3, 120, 2
    hops = world.cfg.hops_per_round * world.rounds
    assert len(trace) == hops == int(state["hops"])
    for message in trace:  # no label, no image, no weight: class ids and float16 scores per probe image
        assert {key: (v.shape, v.dtype) for key, v in message.items()} == {
            "classes": ((A, n, k), np.uint8), "scores": ((A, n, k), np.float16)}
    assert list(np.asarray(state["bytes_sent"]["probe"])) == [hops * n * k * 3] * A
    # the first hop carries exactly each sender's top-k of its own scores, computed from the probe images
    # alone (task 0's sub-network and Gaussians are frozen once learnt: the final state recomputes them)
    first = trace[0]
    shift = agents.round_shift("ring", A, 0, 0)
    for a in range(A):
        b = (a + shift) % A
        own = tables.table_of(world.tables[b], tables.model_of(state["agents"][b]), world.probe_x, 1, 400)
        want = jax.tree.map(np.asarray, tables.top_k_message(jnp.asarray(own), k))
        np.testing.assert_array_equal(first["classes"][a], want["classes"])
        np.testing.assert_array_equal(first["scores"][a], want["scores"])
        assert set(np.unique(first["classes"][a])) <= set(world.agent_scenarios[b].tasks[0].classes)
    # weights cross in the weights baseline: more bytes than the least weights exchange (parameters only)
    report = collective.collective_report(world, state)["collective"]
    assert report["weights_exchange_bytes"] == [hops * b for b in collective.weights_bytes_per_hop(state)]
    assert all(w > least for w, least in zip(np.asarray(state["bytes_sent"]["weights"]),
                                             report["weights_exchange_bytes"]))


def test_relay_brings_every_class_to_every_agent():
    """Hand-made tables on a ring of 4: after 3 hops every agent holds every origin's best entries."""
    A, n, C = 4, 5, 8
    rng = np.random.default_rng(0)
    own = np.zeros((A, C), bool)
    for a in range(A):
        own[a, 2 * a:2 * a + 2] = True
    own_table = np.where(own[:, None, :], rng.normal(size=(A, n, C)) * 10, -np.inf).astype(np.float32)
    table = own_table.copy()
    for _ in range(A - 1):
        message = jax.vmap(lambda t: tables.top_k_message(t, 2))(jnp.asarray(table))
        message = jax.tree.map(lambda x: jnp.roll(x, -1, 0), message)
        table = np.asarray(jax.vmap(lambda t, m, o, ot: tables.merge(t, tables.dense(m, C), o, ot))(
            jnp.asarray(table), message, own, own_table))
    best = np.max(own_table, axis=0)  # every agent's dense table merged
    for a in range(A):
        np.testing.assert_array_equal(np.argmax(table[a], -1), np.argmax(best, -1))
        np.testing.assert_array_equal(table[a][own[a][None].repeat(n, 0)], own_table[a][own[a][None].repeat(n, 0)])


def test_lambda_zero_is_the_agent_alone(digits, traced):
    world1, state1 = traced[0], traced[1]
    world0 = collective.setup(collective.CollectiveConfig(**{**TINY, "lam": 0.0}), digits, MIND, seed=0)
    trace = []
    state0, _ = _rounds(world0, trace)
    assert trace == [] and int(state0["hops"]) == 0
    assert all(int(b) == 0 for v in collective.VARIANTS for b in state0["bytes_sent"][v])
    rows = collective.evaluate(world0, state0, world0.rounds)
    np.testing.assert_array_equal(rows["collective"], rows["alone"])
    np.testing.assert_array_equal(rows["weights"], rows["alone"])
    # the exchange never touches an agent's own learner: the same weights with and without it
    for a0, a1 in zip(state0["agents"], state1["agents"]):
        for x, y in zip(jax.tree.leaves(a0["params"]), jax.tree.leaves(a1["params"])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows1 = collective.evaluate(world1, state1, world1.rounds)
    np.testing.assert_array_equal(rows1["alone"], rows["alone"])
    # with the exchange the agents classify the others' classes; alone they cannot
    report0 = collective.collective_report(world0, state0)["collective"]
    report1 = collective.collective_report(world1, state1)["collective"]
    assert all(a["other_classes"] == 0 for a in report0["agents"])
    assert all(a["other_classes"] > 0.3 for a in report1["agents"])


def test_sharded_agents_equal_vmapped_on_2_cpu_devices():
    """4 agents over 2 CPU devices (ppermute relay) against the same run vmapped (subprocess: XLA_FLAGS)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "collective_sharded_check.py")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


CLI = ["--experiment", "collective", "--dataset", "digits", "--agents", "3", "--mind_epochs", "2",
       "--n_probe", "120", "--student_hidden", "64", "--student_epochs", "30", "--joint_epochs", "2",
       "--batch_size", "32"]


def test_cli_writes_the_collective_block(tmp_path, capsys):
    """The run directory of the CLI (stopping and resuming: the conformance test)."""
    workdir = tmp_path / "run"
    assert dkt_cli.main(CLI + ["--workdir", str(workdir)]) == 0
    results = json.loads((workdir / "results.json").read_text())
    block = results["collective"]
    assert set(block) >= {"agents", "joint", "weights_exchange_bytes", "alone", "weights_exchange"}
    assert len(block["agents"]) == 3
    for a in block["agents"]:
        assert set(a) >= {"own_classes", "other_classes", "all_classes", "bytes_sent"}
    assert 0 < block["joint"]["all_classes"] <= 1
    assert (workdir / "collective.md").exists() and (workdir / "collective.png").exists()
    assert results["accuracy_matrix"]["collective"] and results["lead_axes"] == ["agent"]
    out = capsys.readouterr().out
    assert "logits exchange own" in out


@pytest.mark.parametrize("entry", ["collective", "dkt"])
@pytest.mark.parametrize("argv, message", [
    (["--agents", "1"], "agents must be in [2, 10]"),
    (["--agents", "4", "--task_count", "2"], "every agent needs a task"),
    (["--n_probe", "5000"], "n_probe must be in"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message, entry):
    """Both ``python -m experiments.collective`` and ``python -m experiments.dkt --experiment collective``."""
    from experiments import collective as cli

    main = dkt_cli.main if entry == "dkt" else cli.main
    lead = ["--experiment", "collective"] if entry == "dkt" else []
    argv = lead + ["--dataset", "digits", "--workdir", str(tmp_path / "w")] + argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_collective_cli_stands_alone():
    """experiments.collective imports nothing of experiments.dkt; the dkt command only dispatches to it."""
    code = "import sys, experiments.collective; assert 'experiments.dkt' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for argv in (["--experiment", "collective"], ["--experiment=collective", "--agents", "3"],
                 ["--dataset", "digits", "--experiment", "collective"]):
        assert dkt_cli.experiment_of(argv) == "collective"
    assert dkt_cli.experiment_of(["--agents", "3"]) is None
