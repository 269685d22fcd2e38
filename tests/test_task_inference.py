"""Task inference: every rule on a constructed case, the kept sub-network outputs against a recomputation, the
choice on validation data only, statistics through checkpoints, and every rule at CIFAR shape (the Gaussian
statistics themselves: test_gaussians.py)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import checkpoint, data, gaussians, loop, masks, routing, task_inference
from modkd_jax.methods import baselines, experts, mind
from modkd_jax.task_inference import InferenceConfig

KEY = jax.random.key(0)


def _gauss_stats(tasks_x, tasks_y, classes):
    per = [gaussians.fit(x, y, classes, rank=0, components=1, key=KEY) for x, y in zip(tasks_x, tasks_y)]
    return {k: jnp.asarray(np.stack([p[k] for p in per])) for k in per[0]}


def test_every_rule_picks_the_right_task_where_it_should_and_max_prob_fails_where_it_is_known_to():
    # Three tasks of 3 classes; one input of task 0 each. Logits chosen so each rule's signal points at task 0.
    def probs_logits(p):
        return np.log(np.asarray(p, np.float64))

    seen = 3
    # max_prob: task 0 is the most confident
    z = np.stack([probs_logits([[0.9, 0.05, 0.05]]), probs_logits([[0.5, 0.3, 0.2]]), probs_logits([[0.4, 0.3, 0.3]])])
    assert int(task_inference.infer(["max_prob"], jnp.asarray(z), seen)["max_prob"][0]) == 0
    # entropy (and top2_entropy): task 0 is flat over two classes (max .5, entropy ln 2), task 1 more confident
    # but spread over three (max .55, entropy 0.99): max_prob picks 1, the entropy rules 0
    z = np.stack([probs_logits([[0.5, 0.5 - 1e-6, 1e-6]]), probs_logits([[0.55, 0.225, 0.225]]),
                  probs_logits([[0.34, 0.33, 0.33]])])
    got = task_inference.infer(["max_prob", "entropy", "top2_entropy"], jnp.asarray(z), seen)
    assert [int(got[r][0]) for r in ("max_prob", "entropy", "top2_entropy")] == [1, 0, 0]
    # energy: task 0's logits are large but tied (max prob .5), task 1's small but peaked
    z = np.asarray([[[6.0, 6.0, -3.0]], [[1.0, -5.0, -5.0]], [[0.0, 0.0, 0.0]]])
    got = task_inference.infer(["max_prob", "energy"], jnp.asarray(z), seen)
    assert int(got["max_prob"][0]) == 1 and int(got["energy"][0]) == 0
    # entropy_grad: the task whose weight's increase lowers the entropy fastest
    grad = jnp.asarray([[-0.3, 0.2, 0.1]])
    assert int(task_inference.infer(["entropy_grad"], jnp.asarray(z), seen, grad=grad)["entropy_grad"][0]) == 0


def test_gaussian_and_prototype_rules_recognise_the_task_where_max_prob_is_fooled():
    """max_prob's known failure: a sub-network that never saw an input is confidently wrong about it.

    Inputs come from task 1's class-conditional Gaussians; sub-network 0 is overconfident on them (the
    failure on Split MNIST, task identified for ~50 % of inputs); the rules that model the input pick task 1.
    """
    rng = np.random.default_rng(0)
    d, n = 6, 200
    centres = rng.normal(size=(2, 2, d)) * 4  # task, class
    tasks_x = [np.concatenate([rng.normal(size=(n, d)) + centres[t, c] for c in range(2)]) for t in range(2)]
    tasks_y = [np.repeat([0, 1], n)] * 2
    stats = {"gauss_input": _gauss_stats(tasks_x, tasks_y, 2),
             "gauss_own": _gauss_stats(tasks_x, tasks_y, 2), "gauss_first": _gauss_stats(tasks_x, tasks_y, 2)}
    protos = np.stack([np.stack([tasks_x[t][tasks_y[t] == c].mean(0) for c in range(2)]) for t in range(2)])
    stats["prototype"] = jnp.asarray(protos / np.linalg.norm(protos, axis=-1, keepdims=True), jnp.float32)
    x = jnp.asarray(rng.normal(size=(50, d)) + centres[1, 0], jnp.float32)
    logits = jnp.stack([jnp.tile(jnp.asarray([[9.0, 0.0]]), (50, 1)), jnp.tile(jnp.asarray([[2.0, 0.0]]), (50, 1))])
    features = jnp.stack([x, x])
    got = task_inference.infer(["max_prob", "gauss_input", "gauss_own", "gauss_first", "prototype"], logits, 2,
                               x=x, stats=stats, features=features)
    assert np.all(np.asarray(got["max_prob"]) == 0)  # fooled by the overconfident sub-network
    for rule in ("gauss_input", "gauss_own", "gauss_first", "prototype"):
        assert np.mean(np.asarray(got[rule]) == 1) > 0.95, rule
    # unseen tasks are never chosen, whatever their statistics say
    got = task_inference.infer(["gauss_input", "prototype"], logits, 1, x=x, stats=stats, features=features)
    assert np.all(np.asarray(got["gauss_input"]) == 0) and np.all(np.asarray(got["prototype"]) == 0)


def test_standardised_own_feature_likelihoods_are_comparable_across_sub_networks():
    """gauss_own_z: each task's log-likelihood in its own feature space, as a z-score on its own training rows.

    Both sub-networks have 20-dim feature spaces; task 1's rows have a tight spread (0.2), task 0's a wide one (3):
    raw log-likelihoods favour task 1 on everything (its density is higher everywhere near its mean), the
    z-scores do not."""
    rng = np.random.default_rng(0)
    n, d = 400, 20
    cfg = InferenceConfig(gauss_components=1, gauss_rank=0, gauss_shrinkage=0.0)
    stats = task_inference.init_stats(cfg, ["gauss_own", "gauss_own_z"], 2, 1, 4, d)
    own = [(rng.normal(size=(n, d)) * spread).astype(np.float32) for spread in (3.0, 0.2)]
    for t in range(2):
        stats = task_inference.fit_task(cfg, stats, t, jnp.zeros(n, jnp.int32), 1, own=jnp.asarray(own[t]), key=KEY)
        ll = np.asarray(gaussians.task_log_likelihood(jax.tree.map(lambda v: v[t], stats["gauss_own_z"]), own[t]))
        np.testing.assert_allclose(float(stats["gauss_own_z"]["ll_mean"][t]), ll.mean(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(float(stats["gauss_own_z"]["ll_std"][t]), ll.std(ddof=1), rtol=1e-3)
    # inputs of task 0, seen through each sub-network: typical in its own, atypical (too spread) in task 1's
    x0 = rng.normal(size=(100, d)).astype(np.float32) * 3.0
    features = jnp.stack([jnp.asarray(x0), jnp.asarray(rng.normal(size=(100, d)).astype(np.float32) * 0.35)])
    logits = jnp.zeros((2, 100, 1))
    got = task_inference.infer(["gauss_own", "gauss_own_z"], logits, 2, stats=stats, features=features)
    assert np.mean(np.asarray(got["gauss_own"]) == 1) > 0.9  # raw densities are not comparable across spaces
    assert np.mean(np.asarray(got["gauss_own_z"]) == 0) > 0.9


def _digits(task_count=5, val_fraction=0.1):
    return data.build("class_split", data.load("digits"), task_count, seed=0, val_fraction=val_fraction)


def _mind_cfg(**inference):
    return mind.MindConfig(arch="mlp", hidden=(32, 32), epochs=2, distill_epochs=2, batch_size=32, lr=1e-3,
                           distill_lr=5e-3, temperature=None, crop_flip=False,
                           inference=InferenceConfig(gauss_components=2, gauss_rank=8, **inference))


def test_superposed_network_with_one_task_weighted_is_that_sub_network_and_its_gradient_matches_differences():
    sc = _digits()  # 5 tasks, 3 of them owning weights
    m = mind.setup(_mind_cfg(), sc)
    state = mind.init_state(m, jax.random.key(0))
    owner = state["owner"]
    for t in range(3):
        owner = masks.assign(owner, m.kinds, t, 5, key=jax.random.key(t))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(7), p.shape), state["params"])
    bs = jax.tree.map(lambda s: s + jnp.arange(s.shape[0], dtype=s.dtype)[:, None] * 0.1, state["batch_stats"])
    x = data.batching.to_float(sc.tasks[0].test.x[:16], *sc.norm)
    for t in range(3):
        p, b = task_inference.superpose(params, bs, owner, m.kinds, jax.nn.one_hot(t, 5))
        want = m.student.apply({"params": masks.gate(params, masks.forward_mask(owner, t)), "batch_stats": bs}, x, t)
        np.testing.assert_allclose(m.student.apply({"params": p, "batch_stats": b}, x, 0), want, rtol=1e-5, atol=1e-5)
    grad = task_inference.entropy_gradient(m.student.apply, params, bs, owner, m.kinds, x, 3, 5, m.block_size)

    def entropy(alpha):
        p, b = task_inference.superpose(params, bs, owner, m.kinds, alpha)
        z = m.student.apply({"params": p, "batch_stats": b}, x, 0)
        return np.asarray(jax.scipy.special.entr(jax.nn.softmax(z[:, :3 * m.block_size])).sum(-1))

    alpha, eps = jnp.where(jnp.arange(5) < 3, 1 / 3, 0.0), 1e-2
    for t in range(3):
        step = eps * jax.nn.one_hot(t, 5)
        numeric = (entropy(alpha + step) - entropy(alpha - step)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad)[:, t], numeric, rtol=2e-2, atol=2e-3)


class _Unreadable:
    """Stands in for a test split's arrays: any read fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")

    def __getitem__(self, item):
        raise AssertionError("the test split was read ([])")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the test split was read (array)")


def _reference_task_id(m, state, splits, seen, rules):
    """Task identification per rule on host ``splits``, every sub-network recomputed on every batch (nothing
    kept): ``routing.subnet_outputs`` and ``task_inference.infer`` directly, one split after another."""
    params, bs, owner, inference = state["params"], state["batch_stats"], state["owner"], state["inference"]
    mean, std = (jnp.asarray(v) for v in m.scenario.norm)

    @jax.jit
    def tasks(x):
        xf = data.batching.to_float(x, mean, std)
        logits, feats = routing.subnet_outputs(m.student.apply, params, bs, owner, xf, m.task_count, m.block_size)
        grad = task_inference.entropy_gradient(m.student.apply, params, bs, owner, m.kinds, xf, seen, m.task_count,
                                               m.block_size)
        return task_inference.infer(rules, logits, seen, tau=state["tau"], x=task_inference.pixels(x),
                                    stats=inference, features=feats, grad=grad)

    right = {r: 0 for r in rules}
    for j, split in enumerate(splits):
        for r, task in tasks(jnp.asarray(split.x)).items():
            right[r] += int(np.sum(np.asarray(task) == j))
    total = sum(len(split.y) for split in splits)
    return {r: v / total for r, v in right.items()}


def test_the_kept_outputs_give_what_recomputing_every_sub_network_gives():
    """The sub-network evaluator keeps each sub-network's outputs between tasks; its task identification on
    the validation splits, and the test accuracies after every task, equal a fresh recomputation."""
    sc = _digits()
    m = mind.setup(_mind_cfg(report_rules="all"), sc)
    state = mind.init_state(m, jax.random.key(0))
    rules = task_inference.SUBNET_RULES
    for t in range(3):
        state, info = mind.learn_task(m, state, t, jax.random.key(t))
        kept = mind.evaluate(m, state, m.val, t + 1)  # the same placed rows every task: outputs kept
        fresh = mind.evaluate(mind.setup(_mind_cfg(report_rules="all"), sc), state, m.val, t + 1)
        for key, row in fresh.items():
            np.testing.assert_array_equal(kept[key], row, err_msg=key)
        seen_val = [task.val for task in sc.tasks[:t + 1]]
        want = _reference_task_id(m, state, seen_val, t + 1, rules)
        sizes = np.asarray([len(v.y) for v in seen_val])
        for rule in rules:
            got = np.sum(kept[f"task_id_{rule}"][:t + 1] * sizes) / sizes.sum()
            assert got == pytest.approx(want[rule], abs=1.5 / sizes.sum()), rule  # at most one float near-tie
        assert np.all(kept["cil"][t + 1:] == 0) and np.all(np.isfinite(kept["til"]))  # unseen tasks: TIL only


def test_auto_scores_only_the_first_choice_examples_of_each_validation_split():
    sc = _digits()
    m = mind.setup(_mind_cfg(choice_examples=7), sc)
    state = mind.init_state(m, jax.random.key(0))
    for t in range(2):
        state, info = mind.learn_task(m, state, t, jax.random.key(t))
    head = m.val.take(range(2)).head(7)
    assert head.sizes == (7, 7) and head.x is m.val.x
    val = _reference_task_id(m, state, [data.Split(t.val.x[:7], t.val.y[:7], t.val.y_global[:7])
                                        for t in sc.tasks[:2]], 2, task_inference.SUBNET_RULES)
    for rule, acc in info["task_inference"]["val_task_id"].items():
        assert acc == pytest.approx(val[rule], abs=1.5 / 14)  # 14 examples, not every validation row
        assert acc * 14 == pytest.approx(round(acc * 14))
    with pytest.raises(ValueError, match="choice_examples must be >= 0"):
        InferenceConfig(choice_examples=-1)


def test_auto_chooses_on_validation_and_never_reads_the_test_split():
    sc = _digits()
    poison = data.Split(_Unreadable(), _Unreadable(), _Unreadable())
    blind = dataclasses.replace(sc, tasks=tuple(dataclasses.replace(t, test=poison) for t in sc.tasks))
    m = mind.setup(_mind_cfg(), blind)
    state = mind.init_state(m, jax.random.key(0))
    for t in range(3):
        state, info = mind.learn_task(m, state, t, jax.random.key(t))
    choice = info["task_inference"]
    assert set(choice["val_task_id"]) == set(task_inference.SUBNET_RULES)
    assert choice["rule"] == task_inference.choose(choice["val_task_id"], task_inference.SUBNET_RULES)
    assert task_inference.SUBNET_RULES[int(state["inference"]["rule"])] == choice["rule"]
    # the choice is the best task identification on the seen tasks' validation splits
    val = _reference_task_id(m, state, [t.val for t in sc.tasks[:3]], 3, task_inference.SUBNET_RULES)
    sizes = np.asarray([len(t.val.y) for t in sc.tasks[:3]])
    for rule in task_inference.SUBNET_RULES:
        assert choice["val_task_id"][rule] == pytest.approx(val[rule], abs=1.5 / sizes.sum())
    with pytest.raises(AssertionError, match="test split was read"):  # the poison works
        mind.evaluate(m, state, [t.test for t in blind.tasks], 3)


def test_auto_without_validation_data_and_unknown_rules_are_refused():
    fixed_tau = dataclasses.replace(_mind_cfg(), temperature=1.0)
    with pytest.raises(ValueError, match="task_inference auto chooses on the seen tasks' validation"):
        mind.setup(fixed_tau, _digits(val_fraction=0.0))
    mind.setup(dataclasses.replace(fixed_tau, inference=InferenceConfig(task_inference="gauss_input")),
               _digits(val_fraction=0.0))  # a fixed rule needs no validation split
    with pytest.raises(ValueError, match="unknown task inference rule"):
        InferenceConfig(task_inference="oracle")
    with pytest.raises(ValueError, match="not available"):
        experts.setup(experts.preset_config("digits", inference=InferenceConfig(task_inference="gauss_own")),
                      _digits())


def _restore_inference(workdir, learner):
    mngr = checkpoint.manager(workdir)
    state = learner.init_state(jax.random.key(0))
    _, ckpt, _ = checkpoint.latest(mngr, {"state": state, "rng": checkpoint.key_to_array(jax.random.key(0))})
    mngr.close()
    return ckpt["state"]["inference"]


@pytest.mark.parametrize("method", ["mind", "packnet"])
def test_statistics_survive_resume_bit_for_bit_and_are_reported(method, tmp_path):
    sc = _digits()
    if method == "mind":
        learner = mind.learner(_mind_cfg(report_rules="all"), sc)
    else:
        learner = baselines.learner(baselines.BaselineConfig(
            method="packnet", arch="mlp", hidden=(32, 32), epochs=1, retrain_epochs=1, batch_size=32, lr=1e-3,
            crop_flip=False, inference=InferenceConfig(gauss_components=2, gauss_rank=8, report_rules="all")), sc)
    cfg = {"seed": 0}
    loop.run(learner, cfg, tmp_path / "whole", echo=None)
    loop.run(learner, cfg, tmp_path / "part", stop_after=1, echo=None)
    resumed = loop.run(learner, cfg, tmp_path / "part", echo=None)
    a, b = _restore_inference(tmp_path / "whole", learner), _restore_inference(tmp_path / "part", learner)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.all(np.isfinite(np.asarray(a["gauss_input"]["log_weight"])))  # every task fitted
    report = json.loads((tmp_path / "part" / "results.json").read_text())
    ti = report["task_inference"]
    assert ti["rules"] == list(task_inference.SUBNET_RULES) and len(ti["rule_in_use"]) == 5
    assert ti["bytes_per_task"]["max_prob"] == 0
    assert ti["bytes_per_task"]["gauss_input"] == gaussians.nbytes(jax.tree.map(lambda v: np.asarray(v[0]),
                                                                                a["gauss_input"]))
    R = {k: np.asarray(v, float) for k, v in report["accuracy_matrix"].items()}
    for rule in task_inference.SUBNET_RULES:
        assert np.all(R[f"cil_{rule}"][-1] <= R[f"task_id_{rule}"][-1] + 1e-12)
        assert np.all(R[f"cil_{rule}"][-1] <= R["til"][-1] + 1e-12)
    last = ti["rule_in_use"][-1]
    np.testing.assert_array_equal(R["cil"][-1], R[f"cil_{last}"][-1])
    assert report["summary"]["cil"] == resumed["summary"]["cil"]


def test_every_rule_runs_on_resnet32_at_cifar_shape():
    """CIFAR-shaped inputs (3072 dims: rank-30 covariances, 0.4 MB each) through ResNet-32's sub-networks."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=60):
        ds = data.load("cifar10")
    sc = data.build("class_split", ds, 2, seed=0, val_fraction=0.2)
    cfg = mind.MindConfig(arch="resnet32", epochs=1, distill_epochs=1, batch_size=16, temperature=None,
                          crop_flip=False, eval_batch_size=32, inference=InferenceConfig(gauss_components=1, report_rules="all"))
    learner = mind.learner(cfg, sc)
    res = loop.run(learner, {"seed": 0}, None, echo=None)
    for rule in task_inference.SUBNET_RULES:
        R = np.asarray(res["accuracy_matrix"][f"task_id_{rule}"], float)
        assert np.all((R[-1] >= 0) & (R[-1] <= 1)), rule
    per_task = res["task_inference"]["bytes_per_task"]
    d, r, classes = 3072, 30, len(sc.tasks[0].classes)
    assert per_task["gauss_input"] >= classes * d * (r + 1) * 4  # means + rank-30 bases, float32
    assert per_task["gauss_input"] < 2 * classes * d * (r + 1) * 4 < 37e6  # far below one full covariance
    assert per_task["gauss_own"] < per_task["gauss_input"]  # 64 features


def test_experts_report_every_rule_and_keep_their_task_incremental_accuracy():
    sc = _digits()
    cfg = experts.preset_config("digits", epochs=2, inference=InferenceConfig(gauss_components=2, gauss_rank=8))
    res = loop.run(experts.learner(cfg, sc), {"seed": 0}, None, echo=None)
    routed = loop.run(experts.learner(dataclasses.replace(
        cfg, inference=InferenceConfig(task_inference="prototype", gauss_components=2, gauss_rank=8)), sc),
        {"seed": 0}, None, echo=None)
    R = {k: np.asarray(v, float) for k, v in res["accuracy_matrix"].items()}
    for rule in experts.INFERENCE:
        assert f"cil_{rule}" in R and f"task_id_{rule}" in R
    # the rule changes the class-incremental pick, never what was learnt
    np.testing.assert_array_equal(R["til"], np.asarray(routed["accuracy_matrix"]["til"], float))
    np.testing.assert_array_equal(np.asarray(routed["accuracy_matrix"]["cil"], float), R["cil_prototype"])
    assert res["task_inference"]["bytes_per_task"]["prototype"] > 0
