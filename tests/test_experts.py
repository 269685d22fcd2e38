"""Modular experts: specialization entropy, similarity routing, allocation, the evaluator, knowledge transfer,
the Learner contract (resume) and the CLI on digits."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import experts as cli
from modkd_jax import data, loop, masks, models, routing, training
from modkd_jax import preservation as P
from modkd_jax.data import batching
from modkd_jax.methods import experts as X
from modkd_jax.methods import experts_cost as XC
from modkd_jax.methods import experts_routing as XR
from modkd_jax.methods import kit


def _digits(task_count=2):
    return data.build("class_split", data.load("digits"), task_count, seed=0, val_fraction=0.1)


def test_specialization_entropy_on_hand_made_routing_statistics():
    counts = jnp.array([[10, 0, 0, 0],  # a specialist: every input it receives is task 0's
                        [5, 5, 0, 0],  # two tasks evenly
                        [3, 3, 3, 3],  # a generalist
                        [6, 2, 0, 0],
                        [0, 0, 0, 0]])  # never routed to
    h = np.asarray(routing.specialization_entropy(counts))
    expected = [0.0, math.log(2), math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    np.testing.assert_allclose(h[:4], expected, rtol=1e-6)
    assert np.isnan(h[4]) and not np.signbit(h[0])
    np.testing.assert_allclose(routing.specialization_entropy(7 * counts)[:4], expected, rtol=1e-6)  # counts scale-free
    # counts from routing decisions: C[i, j] = task-j inputs routed to expert i
    c = routing.routing_counts(jnp.array([0, 0, 1, 2, 1]), jnp.array([0, 1, 1, 1, 0]), 3, 2)
    np.testing.assert_array_equal(c, [[1, 1], [1, 1], [0, 1]])


def test_allocation_follows_fit_and_specialization():
    cfg = X.ExpertsConfig(reuse_threshold=0.5, max_entropy=math.log(2), top_k=2)
    counts = np.array([[100, 0, 0], [50, 50, 0], [0, 0, 0]], float)
    active = np.array([True, True, False])
    # expert 0 (a specialist) fits 80% of the new task: reused, it stays below ln 2 (100 vs 80 inputs)
    experts, decision, info = XR.allocate(cfg, 2, counts, np.array([80, 0, 0]), np.array([0.8, 0.0, 0.0]), active)
    assert (experts, decision) == ([0], "reuse") and info["entropy_if_reused"][0] < math.log(2)
    # expert 1 fits as well but already holds two tasks evenly: a third would exceed ln 2 -> a new expert
    experts, decision, _ = XR.allocate(cfg, 2, counts, np.array([0, 80, 0]), np.array([0.0, 0.8, 0.0]), active)
    assert (experts, decision) == ([2], "new")
    # too little fit -> new; allocation "new" never reuses; a full pool reuses the best fit
    assert XR.allocate(cfg, 2, counts, np.array([40, 0, 0]), np.array([0.4, 0, 0]), active)[:2] == ([2], "new")
    cfg_new = X.ExpertsConfig(allocation="new")
    assert XR.allocate(cfg_new, 2, counts, np.array([80, 0, 0]), np.array([0.8, 0, 0]), active)[:2] == ([2], "new")
    full = np.ones(3, bool)
    assert XR.allocate(cfg, 2, counts, np.array([0, 30, 10]), np.array([0, 0.3, 0.1]), full)[:2] == ([1], "forced")


def test_routing_is_permutation_equivariant_over_experts():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    emb = jax.random.normal(k1, (64, 16))
    protos = jax.random.normal(k2, (12, 16))
    owner = jnp.arange(12) % 4  # 4 experts, 3 prototypes each
    membership = owner[None, :] == jnp.arange(4)[:, None]
    base = np.asarray(routing.route(emb, protos, membership))
    assert len(set(base.tolist())) > 1  # a non-trivial decision
    for perm in ([1, 0, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        perm = np.asarray(perm)
        # new expert i is old expert perm[i]: the decision is relabelled accordingly
        moved = np.asarray(routing.route(emb, protos, membership[perm]))
        np.testing.assert_array_equal(perm[moved], base)
        scores = routing.prototype_scores(emb, protos, membership)
        np.testing.assert_array_equal(routing.soft_top_k(scores[:, perm], 2, 0.1),
                                      routing.soft_top_k(scores, 2, 0.1)[:, perm])
    # reordering the prototypes changes nothing
    order = np.asarray(jax.random.permutation(k3, 12))
    np.testing.assert_array_equal(routing.route(emb, protos[order], membership[:, order]), base)
    # soft top-k: k non-zero weights summing to 1, on the k best experts
    w = np.asarray(routing.soft_top_k(routing.prototype_scores(emb, protos, membership), 2, 0.1))
    assert np.all((w > 0).sum(1) == 2) and np.allclose(w.sum(1), 1.0)
    assert np.all(np.argmax(w, 1) == base)


@pytest.fixture(scope="module")
def reused():
    """Two tasks on new experts, then task 2 forced to reuse both (permissive thresholds): ``(ex, before, state)``."""
    sc = _digits(5)
    cfg = X.ExpertsConfig(hidden=(16, 16), epochs=5, batch_size=32, prototypes=4, embed_dim=16, reuse_threshold=0.0,
                          max_entropy=10.0)
    ex = X.setup(cfg, sc)
    state = X.init_state(ex, jax.random.key(0))
    new_only = dataclasses.replace(ex, cfg=dataclasses.replace(cfg, allocation="new"))
    for t in range(2):
        state, info = X.learn_task(new_only, state, t, jax.random.key(t + 1))
        assert info["decision"] == "new" and info["experts"] == [t]
    before = state
    state, info = X.learn_task(ex, jax.tree.map(jnp.copy, state), 2, jax.random.key(3))
    assert info["decision"] == "reuse" and sorted(info["experts"]) == [0, 1]
    return ex, before, state


def test_reused_experts_train_as_a_soft_top_k_mixture_and_keep_their_tasks(reused):
    ex, before_state, state = reused
    tests = [t.test for t in ex.scenario.tasks]
    before = X.evaluate(ex, before_state, tests, seen=2)
    after = X.evaluate(ex, state, tests, seen=3)
    assert np.isnan(before["til"][2:]).all() and np.isnan(after["cil"][3:]).all()  # unseen tasks: no accuracy
    assert np.asarray(state["router"]["membership"])[:, 2].sum() == 2 and after["activated"][2] > 1.5
    assert after["til"][2] > 0.8
    # routing statistics: every held-out input counts once (split by soft top-k weight between shared experts)
    sizes = [len(X.stats_split(ex, ex.scenario.tasks[j])) for j in range(3)]
    np.testing.assert_allclose(np.asarray(state["counts"]).sum(0), sizes + [0, 0], rtol=1e-5)
    assert np.all(after["til"][:2] >= before["til"][:2] - 0.1)  # distillation keeps the reused experts' tasks
    for old, new in zip(jax.tree.leaves(before_state["params"]), jax.tree.leaves(state["params"])):
        assert not np.array_equal(np.asarray(old)[:2], np.asarray(new)[:2])  # both reused experts trained
        np.testing.assert_array_equal(np.asarray(old)[2:], np.asarray(new)[2:])  # the idle ones untouched


def test_the_dense_evaluator_equals_running_only_the_chosen_experts(reused):
    """One compiled call runs every expert; it must count what routing to (and mixing) only the chosen ones gives."""
    ex, _, state = reused
    k, cfg, router = ex.block_size, ex.cfg, state["router"]
    membership = np.asarray(router["membership"])
    pool = {"params": state["params"], "batch_stats": state["batch_stats"]}
    mean, std = (jnp.asarray(a, jnp.float32) for a in ex.scenario.norm)

    def predict(x, task):  # task's own experts only, on its batch-norm rows and class block
        slots = np.flatnonzero(membership[:, task])
        emb = XR.embed(router["projection"], x)
        w = XR.task_weights(router, emb, task, cfg.top_k, cfg.route_temperature)[:, slots]
        z = jnp.stack([training.block(ex.model.apply(XR.take(pool, s), batching.to_float(x, mean, std), task),
                                      task, k) for s in slots])
        return np.asarray(jnp.argmax(XR.mix(z, w), -1))

    got = X.evaluate(ex, state, [t.test for t in ex.scenario.tasks], seen=3)
    chosen = X.INFERENCE[int(state["inference"]["rule"])]
    for j in range(3):
        x, y = ex.scenario.tasks[j].test.x, ex.scenario.tasks[j].test.y
        expert, task = (np.asarray(a) for a in XR.route(router, XR.embed(router["projection"], x)))
        cil = [task[i] == j and predict(x[i:i + 1], int(task[i]))[0] == y[i] for i in range(len(y))]
        assert got["til"][j] == pytest.approx(np.mean(predict(x, j) == y))
        assert got["cil_prototype"][j] == pytest.approx(np.mean(cil))  # the router's task
        assert got["routing"][j] == pytest.approx(np.mean(membership[expert, j]))
        assert got["task_id_prototype"][j] == pytest.approx(np.mean(task == j))
        assert got["cil"][j] == got[f"cil_{chosen}"][j] and got["task_id"][j] == got[f"task_id_{chosen}"][j]
        if chosen == "prototype":  # experts run per prediction: those of the task the rule in use infers
            assert got["activated"][j] == pytest.approx(np.mean(membership[:, task].sum(0)))


def test_knowledge_transfer_copies_exactly_the_selected_parameters():
    sc = _digits()
    old = models.build("mlp", 10, 2, hidden=(8, 8))
    new = models.build("mlp", 10, 2, hidden=(16, 16))
    old_p, old_bs = models.init(old, jax.random.key(1), sc.input_shape)
    new_p, new_bs = models.init(new, jax.random.key(2), sc.input_shape)
    kinds = models.leaf_kinds(old_p)
    sel = P.select_valuable(P.importance(old_p, "magnitude"), kinds, task=0, keep=0.3, block_size=5)
    for s, w, kind in zip(jax.tree.leaves(sel), jax.tree.leaves(old_p), jax.tree.leaves(kinds)):
        if kind == masks.GATED:  # exactly the top 30% by |w|
            assert int(s.sum()) == round(0.3 * s.size)
            assert float(jnp.min(jnp.abs(w)[s])) >= float(jnp.max(jnp.abs(w)[~s]))
    out = P.transfer(old_p, new_p, sel)
    for o, n, t, s in zip(jax.tree.leaves(old_p), jax.tree.leaves(new_p), jax.tree.leaves(out), jax.tree.leaves(sel)):
        where = np.asarray(P.embed_corner(s, n.shape, False))
        corner = np.asarray(P.embed_corner(o, n.shape, 0))
        np.testing.assert_array_equal(np.asarray(t)[where], corner[where])  # the selected entries, copied
        np.testing.assert_array_equal(np.asarray(t)[~where], np.asarray(n)[~where])  # nothing else touched
    new_kinds = models.leaf_kinds(new_p)
    owner = P.transfer_owner(masks.init_owners(new_p, new_kinds, (5, 5)), sel, new_kinds, 0)
    k0 = np.asarray(owner["dense0"]["kernel"])
    assert (k0 == 0).sum() == int(sel["dense0"]["kernel"].sum()) and set(np.unique(k0)) == {masks.FREE, 0}
    # a narrower new model cannot hold the old leaves: the plan hands them to distillation
    small_p, _ = models.init(models.build("mlp", 10, 2, hidden=(4, 16)), jax.random.key(3), sc.input_shape)
    plan = P.transfer_plan(old_p, small_p)
    assert plan["dense0/kernel"] == plan["dense1/kernel"] == "distill" and plan["classifier/kernel"] == "copy"
    moved = P.transfer(old_p, small_p, sel)
    np.testing.assert_array_equal(moved["dense0"]["kernel"], small_p["dense0"]["kernel"])
    # keep = 1: the new model computes the old task exactly as the old model did
    sel = P.select_valuable(P.importance(old_p), kinds, 0, 1.0, 5)
    p = P.transfer(old_p, new_p, sel)
    bs = P.transfer_batch_stats(old_bs, new_bs, 0)
    o = P.transfer_owner(masks.init_owners(new_p, new_kinds, (5, 5)), sel, new_kinds, 0)
    x = jnp.asarray(sc.tasks[0].test.x[:32], jnp.float32) / 255.0
    ours = new.apply({"params": masks.gate(p, masks.forward_mask(o, 0)), "batch_stats": bs}, x, 0)
    theirs = old.apply({"params": old_p, "batch_stats": old_bs}, x, 0)
    np.testing.assert_allclose(ours[:, :5], theirs[:, :5], rtol=1e-5, atol=1e-5)


def test_preserve_keeps_the_old_task_while_learning_the_next():
    sc = _digits()
    old = models.build("mlp", 10, 2, hidden=(16, 16))
    new = models.build("mlp", 10, 2, hidden=(32, 32))
    mean, std = (tuple(float(v) for v in a) for a in sc.norm)
    params, bs = models.init(old, jax.random.key(0), sc.input_shape)
    tx = training.make_optimizer("adam", 0.005)
    full = masks.full_mask(params)
    step = training.make_step(kit.make_loss(old.apply, 5), tx, training.augmenting(mean, std))
    params, bs, _ = training.run_phase(step, (params, bs, tx.init(params)), sc.tasks[0].train,
                                       kit.Context(jnp.int32(0), full, full), training.Phase(8, 32, 0.005),
                                       jax.random.key(1))
    info = P.preserve(old, {"params": params, "batch_stats": bs}, new, sc, jax.random.key(2), method="copy", keep=1.0,
                      epochs=8, batch_size=32, lr=0.005)
    assert info["old_acc"] > 0.9 and info["new_task_acc"] > 0.9
    assert info["transferred_acc"] == info["old_acc"]  # an exact copy computes the old task as before
    assert info["retained_acc"] == info["transferred_acc"]  # frozen and isolated while task 1 is learnt
    d = P.preserve(old, {"params": params, "batch_stats": bs}, new, sc, jax.random.key(2), method="distill", keep=0.5,
                   epochs=4, batch_size=32, lr=0.005)
    assert d["retained_acc"] == d["transferred_acc"] > 0.6  # distilled without old data, then isolated


def test_learner_resumes_after_a_stop_with_the_same_numbers(tmp_path):
    """Through the one loop: one checkpoint per task, resumed == uninterrupted (a reused expert in the state)."""
    sc = _digits(5)
    cfg = X.preset_config("digits", epochs=1, max_experts=2, reuse_threshold=0.0, max_entropy=10.0)
    learner = X.learner(cfg, sc)
    whole = loop.run(learner, {"seed": 0}, None, echo=None)
    loop.run(learner, {"seed": 0}, tmp_path, stop_after=3, echo=None)
    res = loop.run(learner, {"seed": 0}, tmp_path, echo=None)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3, 4, 5]
    assert [i["decision"] for i in res["task_infos"]] == ["new"] + ["reuse"] * 4
    for rule in X.RULES:
        np.testing.assert_array_equal(np.asarray(res["accuracy_matrix"][rule], float), whole["accuracy_matrix"][rule])
    untimed = lambda infos: [{k: v for k, v in i.items() if k not in ("seconds", "compiles")} for i in infos]  # noqa: E731
    assert untimed(res["task_infos"]) == untimed(whole["task_infos"])
    assert set(res["flops"]) == {"til", "expert_forward", "router", "xla_expert_forward", "inference"}
    assert res["params"] == XC.pool_params(cfg, sc)
    assert res["params"]["experts"] == 2 * XC.mlp_params((32, 32), 10, 5, sc.input_shape)  # max_experts


def test_cli_end_to_end_on_digits(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--dataset", "digits", "--seeds", "0", "1", "--epochs", "6", "--no_preserve", "--workdir", str(run)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Welch t-test experts vs monolithic" in out and "Welch t-test experts vs mind" in out
    for name in ("config.json", "results.json", "accuracy_matrices.png", "specialization.png"):
        assert (run / name).is_file(), name
    for unit in ("experts_s0", "experts_s1", "monolithic_s0", "monolithic_s1", "mind_s0", "mind_s1"):
        for name in ("config.json", "metrics.jsonl", "results.json"):
            assert (run / unit / name).is_file(), (unit, name)
    res = json.loads((run / "results.json").read_text())
    agg = res["aggregate"]
    assert set(agg) == {"experts", "monolithic", "mind"}
    assert agg["experts"]["til_acc"]["mean"] > 0.9 and agg["experts"]["routing_acc"]["mean"] > 0.7
    assert agg["experts"]["cil_acc"]["mean"] > agg["monolithic"]["cil_acc"]["mean"]
    # equal parameter budgets (within 2%), and the experts predict with a fraction of MIND's compute
    p = {m: agg[m]["params"]["mean"] for m in agg}
    assert abs(p["monolithic"] - p["experts"]) / p["experts"] < 0.02
    assert abs(p["mind"] - p["experts"]) / p["experts"] < 0.1
    flops = {m: agg[m]["flops_cil"]["mean"] for m in agg}
    unit = json.loads((run / "experts_s0" / "results.json").read_text())
    # a CIL prediction costs the rule in use (the router alone, or every seen task's Gaussians ...) plus the
    # experts of the task it infers
    rule = unit["task_inference"]["rule_in_use"][-1]
    assert (unit["flops"]["inference"] == unit["flops"]["router"]) == (rule == "prototype")
    assert flops["experts"] == pytest.approx(np.mean([
        json.loads((run / f"experts_s{s}" / "results.json").read_text())["flops"]["inference"] for s in (0, 1)])
        + agg["experts"]["activated"]["mean"] * unit["flops"]["expert_forward"])
    assert unit["flops"]["xla_expert_forward"] == pytest.approx(unit["flops"]["expert_forward"], rel=0.1)
    # one expert per task here; new experts leave earlier ones untouched: no task-incremental forgetting
    assert np.asarray(unit["membership"]).sum() == 5 and agg["experts"]["til_forgetting"]["mean"] == 0.0
    lines = [json.loads(line) for line in (run / "experts_s0" / "metrics.jsonl").read_text().splitlines()]
    summaries = [ln for ln in lines if ln["phase"] == "summary"]
    assert len(summaries) == 5 and all(len(ln["specialization"]) == 5 for ln in summaries)
    # killed between tasks 4 and 5 of one unit: re-running the command resumes it, same numbers
    shutil.rmtree(run / "experts_s1" / "checkpoints" / "5")
    (run / "experts_s1" / "results.json").unlink()
    assert cli.main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    again = json.loads((run / "results.json").read_text())
    assert again["aggregate"] == agg


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert cli.main(["--dataset", "digits", "--task_count", "3", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "divide" in err and err.count("\n") == 0 and not workdir.exists()
    for argv, word in ((["--keep", "0"], "keep"), (["--top_k", "0"], "top_k"), (["--dataset", "cifar10"], "supports")):
        assert cli.main(["--dataset", "digits", *argv, "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err.strip()
        assert word in err and err.count("\n") == 0 and not workdir.exists()
