"""DKT: two-head network, probe-only exchange, lambda=0 == alone, bytes, sharded == vmapped, the CLI on digits.

The CLI runs go through ``modkd_jax.loop``: results schema, one checkpoint per
experience, resumed == uninterrupted, bad input one line and exit 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dkt as cli
from modkd_jax import agents, data, loop, losses, models
from modkd_jax.methods import dkt
from modkd_jax.models import two_head

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden=(32, 32), epochs=2, teacher_epochs=2, batch_size=32, probe_batch_size=16, n_probe=64,
            lr=2e-3, eval_batch_size=360)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _train(world, tasks):
    """Train ``tasks`` experiences through the Learner; return state, progress and the accuracy rows after each."""
    learner, rows = dkt.learner(world), []
    state = learner.init_state(jax.random.key(0))
    for t in range(tasks):
        state, _ = learner.learn_task(state, t, jax.random.key(t))
        rows.append(learner.evaluate(state, t + 1))
    prog = state["progress"]
    return state, {"rounds": int(prog["rounds"]), "bytes_sent": [int(b) for b in prog["bytes_sent"]]}, rows


def test_two_head_model_shares_features():
    model = two_head.TwoHead(10, "mlp", (16,))
    params, bs = two_head.init(model, jax.random.key(0), (8, 8, 1))
    assert set(params) == {"features", "cl_head", "student_head"}
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    cl, st = model.apply({"params": params, "batch_stats": bs}, x)
    assert cl.shape == st.shape == (4, 10)
    # the heads are separate layers on the same features: zeroing one head leaves the other unchanged
    zeroed = {**params, "student_head": jax.tree.map(jnp.zeros_like, params["student_head"])}
    cl2, st2 = model.apply({"params": zeroed, "batch_stats": bs}, x)
    np.testing.assert_array_equal(cl, cl2)
    assert np.all(np.asarray(st2) == 0)
    resnet = two_head.TwoHead(10, "resnet32")
    shapes = jax.eval_shape(lambda: two_head.init(resnet, jax.random.key(0), (32, 32, 3)))[0]
    assert "classifier" not in shapes["features"] and shapes["cl_head"]["kernel"].shape == (64, 10)


def test_probe_set_is_held_out_of_every_agent(digits):
    world = dkt.setup(dkt.DKTConfig(**TINY, agents=3), digits, 5, seed=0)
    n = len(digits.train_y)
    assert len(world.probe_x) == 64 and len(np.unique(world.probe_index)) == 64
    rest = np.setdiff1d(np.arange(n), world.probe_index)
    rest_hashes = {row.tobytes() for row in digits.train_x[rest]}
    probe_only = {row.tobytes() for row in world.probe_x} - rest_hashes  # (exact duplicates aside)
    orders = set()
    for scen in world.scenarios:
        seen = [row.tobytes() for task in scen.tasks for split in (task.train, task.val) for row in split.x]
        assert len(seen) == n - 64 and not probe_only & set(seen)
        orders.add(tuple(np.concatenate([t.classes for t in scen.tasks])))
    assert len(orders) == 3  # each agent its own class order of the same dataset


def test_probe_mode_sends_only_probe_logits(digits):
    world = dkt.setup(dkt.DKTConfig(**TINY, agents=3, exchange="probe"), digits, 5, seed=0)
    state, prog, _ = _train(world, 2)
    seen = np.stack([agents.class_mask(s, 2, 10) for s in world.scenarios])
    message = dkt.send(world, state["learners"], seen, None)
    leaves = jax.tree_util.tree_leaves_with_path(message)
    assert [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in leaves] == [
        ("['logits']", (3, 64, 10), jnp.float32)]
    # the contents are each agent's CL-head logits on the probe images, unseen classes masked
    mean, std = world.scenarios[0].norm
    for a in range(3):
        variables = {"params": jax.tree.map(lambda x: x[a], state["learners"]["params"]),
                     "batch_stats": jax.tree.map(lambda x: x[a], state["learners"]["batch_stats"])}
        cl, _ = world.model.apply(variables, data.to_float(world.probe_x, mean, std))
        np.testing.assert_allclose(message["logits"][a], losses.masked_logits(cl, seen[a]), rtol=1e-5, atol=1e-5)
    # what an agent sends is computed from its weights, its seen mask and the public probe images only
    shared = {"probe_x": world.probe_x}
    jaxpr = jax.make_jaxpr(world.fns["message"])(state["learners"], seen, shared)
    assert len(jaxpr.jaxpr.invars) == len(jax.tree.leaves((state["learners"], seen, shared)))
    np.testing.assert_array_equal(message["logits"], dkt.send(world, state["learners"], seen, None)["logits"])
    # the receiver gets exactly its ring neighbour's logits, and learns which classes they cover
    inbox = dkt.receive(world, state["inbox"], agents.shift_agents(message, 1, None), None)
    np.testing.assert_array_equal(inbox["message"]["logits"], np.roll(message["logits"], -1, 0))
    np.testing.assert_array_equal(inbox["taught"], np.roll(seen, -1, 0) | np.asarray(state["inbox"]["taught"]))
    assert prog["bytes_sent"] == [64 * 10 * 4 * prog["rounds"]] * 3


@pytest.mark.parametrize("mode", ["probe", "weights"])
def test_lambda_zero_equals_alone_and_bytes(digits, mode):
    cfg = dict(TINY, agents=3, epochs=1, exchange=mode, topology="gossip")
    worlds = {name: dkt.setup(dkt.DKTConfig(**c), digits, 5, seed=1)
              for name, c in {"lam0": {**cfg, "lam": 0.0}, "alone": {**cfg, "alone": True},
                              "lam1": {**cfg, "lam": 1.0}}.items()}
    (s0, p0, r0), (sa, pa, ra), (s1, p1, r1) = (_train(worlds[n], 3) for n in ("lam0", "alone", "lam1"))
    for a, b in zip(jax.tree.leaves(s0["learners"]), jax.tree.leaves(sa["learners"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, y in zip(r0, ra):
        np.testing.assert_array_equal(x["cl_til"], y["cl_til"])
        np.testing.assert_array_equal(x["cl_cil"], y["cl_cil"])
    assert np.all(np.isnan(ra[-1]["student_cil"])) and pa == {"rounds": 0, "bytes_sent": [0, 0, 0]}
    # lam = 0 leaves the student head at its init; lam > 0 trains it and changes the shared features
    init = dkt.init_learners(worlds["lam0"], [dkt.learner_key(worlds["lam0"], 0, a) for a in range(3)])
    np.testing.assert_array_equal(np.asarray(s0["learners"]["params"]["student_head"]["kernel"]),
                                  np.asarray(init["params"]["student_head"]["kernel"]))
    assert not np.allclose(s1["learners"]["params"]["student_head"]["kernel"], init["params"]["student_head"]["kernel"])
    assert not np.allclose(s1["learners"]["params"]["features"]["dense0"]["kernel"],
                           s0["learners"]["params"]["features"]["dense0"]["kernel"])
    # bytes: one message per agent per round, after each of the 3 epochs (3 of 5 experiences, 1 epoch each)
    if mode == "probe":
        per_round = 64 * 10 * 4
    else:
        n_params = models.param_count(jax.tree.map(lambda x: x[0], init["params"]))
        per_round = 4 * (n_params + 2 * 2 * 32) + 10  # float32 params + BN mean/var (2 layers x 32) + seen mask
    assert p1["rounds"] == p0["rounds"] == 3
    assert p1["bytes_sent"] == p0["bytes_sent"] == [3 * per_round] * 3


def test_sharded_agents_equal_vmapped_on_8_cpu_devices():
    """8 agents, one per CPU device, against the same run vmapped on one device (subprocess: XLA_FLAGS)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dkt_sharded_check.py")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "probe: sharded == vmapped" in out and "weights: sharded == vmapped" in out
    assert "resume: sharded run resumed after 2 experiences == uninterrupted" in out
    assert "only {(1, 64, 10)} float32 logits cross devices" in out and out.strip().endswith("OK")


SMALL = ["--dataset", "digits", "--epochs", "3", "--teacher_epochs", "3", "--n_probe", "100"]


@pytest.mark.parametrize("experiment, extra", [
    ("joint_teacher", []),
    ("continual_teacher", ["--exchange", "weights"]),
    ("agents", ["--agents", "3", "--topology", "gossip", "--exchange_every", "2"]),
])
def test_each_experiment_writes_its_run_directory(tmp_path, capsys, experiment, extra):
    run = tmp_path / "run"
    assert cli.main(SMALL + ["--experiment", experiment, "--workdir", str(run)] + extra) == 0
    res = json.loads((run / "results.json").read_text())
    A = 3 if experiment == "agents" else 1
    assert res["schema"] == loop.SCHEMA and res["method"] == "dkt" and res["tasks_done"] == 5
    teacher = dkt.TEACHER_RULES if A == 1 else ()
    assert res["lead_axes"] == ["agent"] and res["rules"] == list(dkt.RULES + teacher) and len(res["agents"]) == A
    assert set(res["accuracy_matrix"]) == set(dkt.RULES + teacher)
    for k in dkt.RULES + teacher:
        assert np.asarray(res["accuracy_matrix"][k], float).shape == (A, 5, 5) and len(res["final"][k]) == A
    assert np.all(np.diagonal(np.asarray(res["accuracy_matrix"]["cl_til"], float), axis1=1, axis2=2) > 0.8)
    assert [ag["class_order_seed"] for ag in res["agents"]] == list(range(A))
    assert (run / "accuracy_matrices.png").is_file() and res["params_per_agent"] == res["params"]["per_agent"]
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3, 4, 5]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["phase"] == "summary" for line in lines) == 5
    ex = res["exchange"]
    rounds = {"joint_teacher": 1, "continual_teacher": 5, "agents": 7}[experiment]  # agents: every 2 of 15 epochs
    assert ex["rounds"] == rounds and ex["bytes_total"] == A * rounds * ex["bytes_per_agent_per_round"]
    assert sum(line["phase"] == "exchange" for line in lines) == rounds
    assert res["task_infos"][-1]["bytes_sent"] == ex["bytes_sent_per_agent"]
    if experiment == "joint_teacher":  # the student head follows a teacher that knows every class
        assert res["final"]["teacher_cil"][0] > 0.8 and res["final"]["student_cil"][0] > 0.5
        assert ex["bytes_per_agent_per_round"] == 100 * 10 * 4
    assert "final: CL_CIL" in capsys.readouterr().out


def test_resume_equals_uninterrupted_run(tmp_path):
    args = cli.parser().parse_args(SMALL + ["--agents", "2", "--exchange", "weights", "--epochs", "1"])
    cfg = cli.resolve_config(args)
    whole = cli.run(cfg, tmp_path / "whole", echo=lambda _: None)
    part = cli.run(cfg, tmp_path / "part", stop_after=2, echo=lambda _: None)
    assert part["tasks_done"] == 2 and part["exchange"]["rounds"] == 2
    messages = []
    resumed = cli.run(cfg, tmp_path / "part", echo=messages.append)
    assert any("resuming" in m and "after task 1" in m for m in messages)
    for k in resumed["accuracy_matrix"]:
        np.testing.assert_array_equal(np.asarray(resumed["accuracy_matrix"][k], float),
                                      np.asarray(whole["accuracy_matrix"][k], float))
    assert resumed["exchange"] == whole["exchange"] and resumed["tasks_done"] == 5


def test_compare_table_reads_the_results(tmp_path, capsys):
    cfg = cli.resolve_config(cli.parser().parse_args(SMALL + ["--task_count", "2", "--epochs", "1"]))
    runs = cli.compare(cfg, tmp_path, echo=lambda _: None)
    assert set(runs) == {"alone", "probe", "weights"} and runs["alone"]["exchange"]["bytes_total"] == 0
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| ") == 4 and "| mean |" in table  # header, 2 agents, mean
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["agents"]["probe"][1]["bytes_sent"] == runs["probe"]["exchange"]["bytes_sent_per_agent"][1]


@pytest.mark.parametrize("argv, message", [
    (["--agents", "1"], "at least 2"),
    (["--agents", "3", "--agent_devices", "2"], "devices"),
    (["--experiment", "joint_teacher", "--compare"], "--compare"),
    (["--exchange_every", "0"], "at least 1"),
    (["--exchange", "gossip"], "unknown exchange"),
    (["--task_count", "3"], "does not divide"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    workdir = tmp_path / "w"
    assert cli.main(["--dataset", "digits", "--workdir", str(workdir)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err
    assert not workdir.exists()
