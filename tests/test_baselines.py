"""Baselines (fine-tuning, joint, PackNet, LwF, EWC): loss terms by hand, EWC's Fisher, PackNet's isolation, the CLI."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import baselines as cli
from experiments.common import build_scenario
from modkd_jax import loop
from modkd_jax import data, fisher, masks, metrics
from modkd_jax.methods import baselines

TINY = ["--dataset", "digits", "--task_count", "5", "--epochs", "1", "--retrain_epochs", "1"]


def _cfg(argv):
    return cli.resolve_config(cli.parser().parse_args(argv))


def _softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    """Split digits, 5 tasks of 2 classes (sklearn's 8x8 set, offline)."""
    return data.build("class_split", data.load("digits"), 5, seed=0, val_fraction=0.1)


# ---------------------------------------------------------------------------------------------- loss terms


def test_lwf_term_is_t2_kl_over_earlier_classes_only():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    T, k = 2.0, 2
    # task 2: earlier classes 0..3; classes 4, 5 (the current task) must not matter
    p, q = _softmax(t[:, :4], T), _softmax(s[:, :4], T)
    want = T**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    got = baselines.lwf_term(jnp.asarray(s), jnp.asarray(t), jnp.int32(2), k, T)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    s2 = s.copy()
    s2[:, 4:] += 100.0
    np.testing.assert_allclose(float(baselines.lwf_term(jnp.asarray(s2), jnp.asarray(t), 2, k, T)), want, rtol=1e-5)
    assert float(baselines.lwf_term(jnp.asarray(s), jnp.asarray(t), jnp.int32(0), k, T)) == 0.0  # nothing to keep
    g = jax.grad(lambda z: baselines.lwf_term(z, jnp.asarray(t), jnp.int32(0), k, T))(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) == 0)


def test_ewc_penalty_hand_computed():
    params = {"a": jnp.array([1.0, 2.0, 3.0]), "b": {"w": jnp.array([[0.5, -1.0]])}}
    anchor = {"a": jnp.array([1.0, 1.0, 1.0]), "b": {"w": jnp.array([[0.0, 1.0]])}}
    fisher = {"a": jnp.array([9.0, 2.0, 0.5]), "b": {"w": jnp.array([[4.0, 0.25]])}}
    want = 0.5 * (9 * 0 + 2 * 1 + 0.5 * 4 + 4 * 0.25 + 0.25 * 4)
    assert float(baselines.ewc_penalty(params, anchor, fisher)) == pytest.approx(want)
    assert float(baselines.ewc_penalty(params, params, fisher)) == 0.0


def test_ewc_fisher_matches_hand_computation_on_a_linear_softmax():
    """Per example, d log p_y / dW = x (e_y - p)^T over the seen classes; the Fisher sums its squares."""
    rng = np.random.default_rng(1)
    n, d, k = 5, 3, 2  # two tasks of two classes, 4 outputs; task 0 sees classes 0..1 only
    w = rng.normal(size=(d, 2 * k)).astype(np.float32)
    x = rng.integers(0, 256, size=(n, 1, d, 1), dtype=np.uint8)
    y = rng.integers(0, k, size=n).astype(np.int32)
    valid = np.array([True, True, True, True, False])  # a padded example must not count

    def apply(variables, xf, task=0, train=False):
        return xf.reshape(xf.shape[0], -1) @ variables["params"]["w"]

    cfg = baselines.BaselineConfig(method="ewc", arch="mlp", head="seen")
    fisher_fn = fisher.make_fisher(apply, k, (0.5,), (0.25,), seen_classes=cfg.head == "seen")
    got = fisher_fn({"params": {"w": jnp.asarray(w)}, "batch_stats": {}}, x, y, valid, jnp.int32(0))["w"]
    xf = (x.reshape(n, d).astype(np.float64) / 255 - 0.5) / 0.25
    want = np.zeros((d, 2 * k))
    for i in range(n - 1):
        p = _softmax(xf[i] @ w[:, :k])
        g = np.outer(xf[i], np.eye(k)[y[i]] - p)
        want[:, :k] += g**2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(got)[:, k:] == 0)  # classes of unseen tasks carry no information

    b = types.SimpleNamespace(cfg=cfg, fisher_fn=fisher_fn)
    split = types.SimpleNamespace(x=x[:4], y=y[:4])
    mean = baselines.fisher_diagonal(b, {"params": {"w": jnp.asarray(w)}, "batch_stats": {}}, split, 0)["w"]
    np.testing.assert_allclose(np.asarray(mean), want / 4, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- methods


def test_joint_pools_every_task_so_far_with_global_labels(digits):
    k = 2
    pooled = baselines.pooled_split(digits, 2, k)
    parts = [digits.tasks[j].train for j in range(3)]
    assert len(pooled) == sum(len(p) for p in parts)
    np.testing.assert_array_equal(pooled.x, np.concatenate([p.x for p in parts]))
    np.testing.assert_array_equal(pooled.y, np.concatenate([p.y + j * k for j, p in enumerate(parts)]))
    assert set(np.unique(pooled.y)) == set(range(3 * k))


def test_packnet_freezes_earlier_tasks_bit_exactly_and_assigns_shares(digits):
    cfg = baselines.BaselineConfig(method="packnet", arch="mlp", hidden=(32, 32), epochs=1, retrain_epochs=1,
                                   batch_size=64, crop_flip=False)
    b = baselines.setup(cfg, digits)
    state = baselines.init_state(b, jax.random.key(0))
    state, _ = baselines.learn_task(b, state, 0, jax.random.key(1), progress=False)
    after0 = jax.tree.map(np.asarray, state)
    acc0 = baselines.evaluate(b, state, [digits.tasks[0].test], 1)["til"][0]
    state, info = baselines.learn_task(b, state, 1, jax.random.key(2), progress=False)
    owner = jax.tree.map(np.asarray, state["owner"])
    # every weight task 0 owns, and its batch-norm statistics, are bit-identical after task 1
    for p0, p1, o in zip(jax.tree.leaves(after0["params"]), jax.tree.leaves(state["params"]), jax.tree.leaves(owner)):
        np.testing.assert_array_equal(p0[o == 0], np.asarray(p1)[o == 0])
    for s0, s1 in zip(jax.tree.leaves(after0["batch_stats"]), jax.tree.leaves(state["batch_stats"])):
        np.testing.assert_array_equal(s0[0], np.asarray(s1)[0])
    assert baselines.evaluate(b, state, [digits.tasks[0].test], 2)["til"][0] == acc0
    # each gated layer: task 0 kept 1/5, task 1 a quarter of the rest; pruned weights are zero
    for o, p, kind in zip(jax.tree.leaves(owner), jax.tree.leaves(state["params"]), jax.tree.leaves(b.kinds)):
        if kind != masks.GATED:
            continue
        n0 = o.size // 5
        assert (o == 0).sum() == n0 and (o == 1).sum() == (o.size - n0) // 4
        assert np.all(np.asarray(p)[o == masks.FREE] == 0)
    assert info["capacity_left"] == pytest.approx(masks.capacity_left(state["owner"], b.kinds))


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every method through the CLI's run(): stopped after 2 tasks, then resumed to the end."""
    out = {}
    for method in baselines.METHODS:
        cfg = _cfg(["--method", method] + TINY)
        workdir = tmp_path_factory.mktemp(method) / "run"
        part = cli.run(cfg, workdir, stop_after=2, echo=lambda _: None)
        messages = []
        whole = cli.run(cfg, workdir, echo=messages.append)
        out[method] = (cfg, workdir, part, whole, messages)
    return out


@pytest.mark.parametrize("method", baselines.METHODS)
def test_cli_writes_results_like_mind_and_resumes(cli_runs, method):
    _, workdir, part, whole, messages = cli_runs[method]
    assert part["tasks_done"] == 2 and whole["tasks_done"] == 5
    assert any("resuming" in m and "after task 1" in m for m in messages)
    assert any("final: TIL" in m for m in messages)
    for name in ("config.json", "metrics.jsonl", "results.json", "accuracy_matrices.png"):
        assert (workdir / name).is_file(), name
    res = json.loads((workdir / "results.json").read_text())
    assert res["method"] == method and res["tasks_done"] == 5
    for rule in ("til", "cil"):
        R = np.asarray(res["accuracy_matrix"][rule], float)
        assert R.shape == (5, 5) and np.all(np.isfinite(R))
        assert set(res["summary"][rule]) >= {"average_accuracy", "forgetting"}
    assert np.asarray(res["accuracy_matrix"]["task_id"], float).shape == (5, 5)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["phase"] == "summary" for line in lines) == 5  # no duplicated task lines
    til = np.asarray(res["accuracy_matrix"]["til"], float)
    assert np.mean(np.diag(til)) > 0.8  # each task is learnt when it is trained


def test_resumed_run_equals_an_uninterrupted_one(cli_runs):
    """EWC carries the most state across tasks (anchor weights, summed Fisher): resuming must restore it."""
    cfg, _, _, resumed, _ = cli_runs["ewc"]
    learner = baselines.learner(cli.config_of_run(cfg), build_scenario(cfg))
    whole = loop.run(learner, cfg, None, echo=None)
    for rule in ("til", "cil"):
        np.testing.assert_array_equal(np.asarray(resumed["accuracy_matrix"][rule], float),
                                      np.asarray(whole["accuracy_matrix"][rule], float))


def test_bounds_and_isolation_behave_as_baselines_should(cli_runs):
    fin = cli_runs["finetune"][3]["summary"]["cil"]
    joint = cli_runs["joint"][3]["summary"]["cil"]
    assert joint["average_accuracy"] > fin["average_accuracy"] + 0.2  # the upper bound beats the lower bound
    assert joint["forgetting"] < fin["forgetting"]
    assert cli_runs["packnet"][3]["summary"]["til"]["forgetting"] == 0.0  # frozen sub-networks never forget


@pytest.mark.parametrize("argv, message", [
    (["--method", "ewc", "--dataset", "digits", "--task_count", "3"], "divide"),
    (["--method", "lwf", "--dataset", "digits", "--epochs", "0"], "at least 1"),
    (["--method", "ewc", "--dataset", "digits", "--ewc_lambda", "-1"], "non-negative"),
    (["--method", "finetune", "--dataset", "digits", "--task_count", "0"], "at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    workdir = tmp_path / "w"
    assert cli.main(argv + ["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err
    assert not workdir.exists()


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--method", "icarl", "--dataset", "digits"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- accuracy report


def test_accuracy_report_statistics(tmp_path):
    """benchmarks/accuracy.py: curves, the best baseline (never the joint upper bound), Welch's t-test, the table."""
    from scipy import stats

    from benchmarks import accuracy

    R = np.array([[0.9, 0.1], [0.6, 0.8]])
    np.testing.assert_allclose(accuracy.curve(R), [0.9, 0.7])

    def run(method, seed, til, cil):
        return {"method": method, "benchmark": "split_mnist", "seed": seed, "seconds": 1.0, "til": R.tolist(),
                "cil": R.tolist(), "summary": {"til": {"average_accuracy": til, "forgetting": 0.0},
                                               "cil": {"average_accuracy": cil, "forgetting": 0.1}}}

    runs = [run("mind", s, 0.99, c) for s, c in enumerate((0.50, 0.56, 0.53))]
    for r in runs:  # a task-inference method: the rule in use and the paper's max-probability rule beside it
        r["rule_in_use"] = ["max_prob", "gauss_input"]
        r["summary"]["cil_max_prob"] = {"average_accuracy": 0.3, "forgetting": 0.0}
    runs += [run("lwf", s, 0.95, c) for s, c in enumerate((0.20, 0.26, 0.23))]
    runs += [run("ewc", s, 0.80, c) for s, c in enumerate((0.19, 0.21, 0.20))]
    runs += [run("joint", s, 0.99, 0.96) for s in range(3)]
    per = accuracy.group(runs)["split_mnist"]
    assert accuracy.best_baseline(per, "cil") == "lwf"  # joint is higher but an upper bound
    a, b = (accuracy.final_values(per[m], "cil", "average_accuracy") for m in ("mind", "lwf"))
    t, p = metrics.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert np.isnan(metrics.welch(np.ones(3), np.ones(3))[1])  # no variance: undefined, not "significant"
    md = accuracy.markdown(runs, accuracy.SETTINGS["quick"], "cmd", "hw")
    assert "| mind | 99.00 ± 0.00 | 0.00 ± 0.00 | 53.00 ± 3.00 | 10.00 ± 0.00 | gauss_input | 30.00 ± 0.00 | 1 |" in md
    assert "| lwf | 95.00 ± 0.00 | 0.00 ± 0.00 | 23.00 ± 3.00 | 10.00 ± 0.00 | - | - | 1 |" in md
    assert "| joint (upper bound) |" in md and "lwf: 23.00 ± 3.00 | +30.00" in md
    assert accuracy.write_report(tmp_path, "acc", runs, accuracy.SETTINGS["quick"], "cmd", "hw") == md
    assert (tmp_path / "acc.md").read_text() == md and (tmp_path / "acc.png").stat().st_size > 0


def test_accuracy_subsample_cuts_every_task(digits):
    from benchmarks import accuracy

    small = accuracy.subsample(digits, 50, 20, seed=0)
    for big, task in zip(digits.tasks, small.tasks):
        assert len(task.train) == 50 and len(task.test) == 20 and len(task.val) <= 5
        assert set(np.unique(task.train.y)) <= set(np.unique(big.train.y))
