"""MIND end to end: the CLI on real data, resume, bad input, exported sub-networks, the CIFAR-100 path."""

import json

import jax
import numpy as np
import pytest

from experiments import mind as cli
from experiments.common import build_scenario
from modkd_jax import checkpoint, masks, models
from modkd_jax.methods import mind

TINY = ["--dataset", "digits", "--task_count", "5", "--epochs", "3", "--distill_epochs", "3"]


def _cfg(argv):
    return cli.resolve_config(cli.parser().parse_args(argv))


def test_cli_writes_the_run_directory(tmp_path, capsys):
    assert cli.main(TINY + ["--workdir", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "results.json", "accuracy_matrices.png"):
        assert (run / name).is_file(), name
    res = json.loads((run / "results.json").read_text())
    til = np.asarray(res["accuracy_matrix"]["til"], float)
    cil = np.asarray(res["accuracy_matrix"]["cil"], float)
    assert til.shape == cil.shape == (5, 5)
    assert np.all(np.diag(til) > 0.9)  # each task learnt
    assert np.all(np.tril(cil, -1)[1:] >= 0) and res["summary"]["til"]["forgetting"] == 0.0  # isolation
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3, 4, 5]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["phase"] == "summary" for line in lines) == 5
    assert "final: TIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "digits", "--task_count", "3"], "divide"),
    (["--dataset", "digits", "--task_count", "0"], "at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    workdir = tmp_path / "w"
    assert cli.main(argv + ["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err
    assert not workdir.exists()  # nothing written as if complete


def test_unknown_dataset_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--dataset", "imagenet"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_workdir_with_other_config_and_corrupt_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    argv = TINY + ["--task_count", "2", "--epochs", "1", "--distill_epochs", "1", "--workdir", str(run)]
    assert cli.main(argv) == 0
    before = (run / "config.json").read_text()
    assert cli.main(argv + ["--beta", "1.0"]) == 2
    assert "different config (mind differ)" in capsys.readouterr().err
    assert (run / "config.json").read_text() == before
    # damage the newest checkpoint: every array file truncated
    for f in (run / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable" in err and err.count("\n") == 0


def test_exported_subnetwork_predicts_like_the_run(tmp_path):
    cfg = _cfg(TINY + ["--task_count", "2", "--epochs", "2", "--distill_epochs", "2"])
    scenario = build_scenario(cfg)
    method = mind.setup(cli.mind_config(cfg), scenario)
    state = mind.init_state(method, jax.random.key(0))
    for t in range(2):
        state, _ = mind.learn_task(method, state, t, jax.random.key(t + 1), progress=False)
    spec = {"arch": "mlp", "hidden": list(cfg["mind"]["hidden"]), "num_outputs": 10, "num_tasks": 2, "block_size": 5}
    checkpoint.export_subnetwork(tmp_path / "sub0", state["params"], state["batch_stats"], state["owner"], 0, spec,
                                 inference=state["inference"])
    spec2, item = checkpoint.load_subnetwork(tmp_path / "sub0")
    for rule, stats in item["inference"].items():  # the task's own task-inference statistics travel with it
        for got, full in zip(jax.tree.leaves(stats), jax.tree.leaves(state["inference"][rule])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(full)[0])
    assert spec2["task"] == 0
    model = models.build("mlp", spec2["num_outputs"], spec2["num_tasks"], hidden=tuple(spec2["hidden"]))
    x = scenario.tasks[0].test.x[:32].astype(np.float32) / 255.0
    ours = model.apply({"params": masks.gate(state["params"], masks.forward_mask(state["owner"], 0)),
                        "batch_stats": state["batch_stats"]}, x, 0)
    theirs = model.apply({"params": item["params"], "batch_stats": item["batch_stats"]}, x, 0)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # weights of task 1 are not in task 0's export
    k = np.asarray(item["params"]["dense0"]["kernel"])
    assert np.all(k[np.asarray(state["owner"]["dense0"]["kernel"]) == 1] == 0)


def test_main_command_path_cifar100_ten_tasks_on_mock_data(tmp_path):
    """`python -m experiments.mind --task_count 10` (CIFAR-100, ResNet-32) on tfds mock data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=200):
        code = cli.main(["--task_count", "10", "--epochs", "1", "--distill_epochs", "1", "--batch_size", "16",
                         "--workdir", str(tmp_path / "c100")])
    assert code == 0
    res = json.loads((tmp_path / "c100" / "results.json").read_text())
    assert res["config"]["mind"]["arch"] == "resnet32" and res["tasks_done"] == 10
    assert np.asarray(res["accuracy_matrix"]["til"]).shape == (10, 10)
    assert res["params"]["teacher"] == 470_004 - 90 * 64 - 90  # ResNet-32 with a 10-class head
    assert res["inference_temperature"] == [6.5] * 10  # the reference's tau for CIFAR-100
    assert res["task_inference"]["rule_in_use"] == ["max_prob"] * 10  # the paper's rule (no validation split)


@pytest.mark.parametrize("extra", [
    ["--self_distillation"],
    ["--policy", "magnitude", "--init_new", "keep"],
    ["--scenario", "permuted"],
    ["--teacher_bn", "batch", "--bn_init", "copy", "--distill_loss", "kd", "--weight_decay", "1e-4"],
], ids=["self_distillation", "magnitude", "permuted", "reference_bn_kd"])
def test_variants_learn_every_task_without_forgetting(tmp_path, extra):
    argv = ["--dataset", "digits", "--task_count", "2", "--epochs", "4", "--distill_epochs", "4"] + extra
    res = cli.run(_cfg(argv), tmp_path / "run")
    til = np.asarray(res["accuracy_matrix"]["til"], float)
    assert np.all(np.diag(til) > 0.85), til
    assert til[1, 0] == til[0, 0]  # task 0's sub-network is untouched by task 1
    if "--self_distillation" in extra:
        assert res["method"] == "mind_self_distillation" and res["config"]["mind"]["policy"] == "magnitude"


# ---------------------------------------------------------------- the paper's loss, tau and protocol
def _distill_metric(cfg: mind.MindConfig, scenario, x, y):
    """The distillation term the compiled step logs on (x, y) for task 1, and the logits it saw."""
    import jax.numpy as jnp

    from modkd_jax.data import batching

    m = mind.setup(cfg, scenario)
    state = mind.init_state(m, jax.random.key(0))
    owner = masks.assign(state["owner"], m.kinds, 0, 2, key=jax.random.key(1))
    owner = masks.assign(owner, m.kinds, 1, 2, key=jax.random.key(2))
    t_params, t_bs = models.init(m.teacher, jax.random.key(3), scenario.input_shape)
    teacher_vars = {"params": t_params, "batch_stats": t_bs}
    fwd, trn = masks.forward_mask(owner, 1), masks.trainable_mask(owner, 1)
    xf = batching.to_float(x, *scenario.norm)
    z_s, _ = m.student.apply({"params": masks.gate(state["params"], fwd), "batch_stats": state["batch_stats"]},
                             xf, 1, train=True, mutable=["batch_stats"])
    z_s = z_s[:, m.block_size:2 * m.block_size]
    z_t = m.teacher.apply(teacher_vars, xf, 0, train=False)
    carry = (state["params"], state["batch_stats"], m.txs["distill"].init(state["params"]))
    from modkd_jax import training

    _, metrics = m.steps["distill"](carry, training.Batch(x, y), jax.random.key(4),
                                    mind.Context(jnp.int32(1), fwd, trn, teacher_vars))
    return float(metrics["distill"]), np.asarray(z_t, np.float64), np.asarray(z_s, np.float64)


def _softmax(z):
    e = np.exp(z - np.max(z, -1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _symkl(zt, zs, T):
    """T^2 * 1/2 [KL(p||q) + KL(q||p)] by hand (float64)."""
    p, q = _softmax(zt / T), _softmax(zs / T)
    return T**2 * np.mean(0.5 * np.sum((p - q) * (np.log(p) - np.log(q)), -1))


def test_distillation_step_uses_the_paper_loss_and_its_own_temperature_never_tau():
    cfg = _cfg(TINY + ["--task_count", "2"])
    scenario = build_scenario(cfg)
    task = scenario.tasks[1]
    x, y = task.train.x[:32], task.train.y[:32]
    base = cli.mind_config(cfg)
    assert (base.distill_loss, base.distill_temperature, base.beta) == ("symkl", 1.0, 5.0)
    import dataclasses

    value, zt, zs = _distill_metric(dataclasses.replace(base, temperature=6.5), scenario, x, y)
    np.testing.assert_allclose(value, _symkl(zt, zs, 1.0), rtol=1e-4)
    # tau is not the distillation temperature: changing it leaves the step's term unchanged ...
    for tau in (1.0, 20.0, None):
        assert _distill_metric(dataclasses.replace(base, temperature=tau), scenario, x, y)[0] == value
    # ... while the distillation temperature and loss do change it, as configured
    value_t4, zt, zs = _distill_metric(dataclasses.replace(base, distill_temperature=4.0), scenario, x, y)
    np.testing.assert_allclose(value_t4, _symkl(zt, zs, 4.0), rtol=1e-4)
    value_js, zt, zs = _distill_metric(dataclasses.replace(base, distill_loss="js"), scenario, x, y)
    from modkd_jax import losses

    np.testing.assert_allclose(value_js, float(losses.js_divergence(zt, zs)), rtol=1e-4)
    assert value_js < value  # JS is the smaller divergence


def test_config_and_results_record_the_losses_and_temperatures(tmp_path):
    assert cli.main(TINY + ["--task_count", "2", "--epochs", "1", "--distill_epochs", "1",
                            "--workdir", str(tmp_path / "auto")]) == 0
    config = json.loads((tmp_path / "auto" / "config.json").read_text())["mind"]
    assert config["distill_loss"] == "symkl" and config["distill_temperature"] == 1.0
    assert config["temperature"] == "auto" and config["tau_grid"] == [0.5, 1.0, 2.0, 4.0, 6.5, 10.0, 20.0]
    res = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert len(res["inference_temperature"]) == 2 and all(t in config["tau_grid"] for t in res["inference_temperature"])
    assert set(res["task_infos"][1]["tau_val_cil"]) == {str(t) for t in config["tau_grid"]}
    assert cli.main(TINY + ["--task_count", "2", "--epochs", "1", "--distill_epochs", "1", "--temperature", "3",
                            "--distill_loss", "js", "--distill_temperature", "2",
                            "--workdir", str(tmp_path / "fixed")]) == 0
    config = json.loads((tmp_path / "fixed" / "config.json").read_text())["mind"]
    assert (config["temperature"], config["distill_loss"], config["distill_temperature"]) == (3.0, "js", 2.0)
    res = json.loads((tmp_path / "fixed" / "results.json").read_text())
    assert res["inference_temperature"] == [3.0, 3.0] and "tau_val_cil" not in res["task_infos"][1]


def test_tau_is_chosen_on_validation_splits_only(monkeypatch):
    from modkd_jax.subnet_eval import SubnetEvaluator

    cfg = _cfg(["--dataset", "digits", "--task_count", "2", "--epochs", "1", "--distill_epochs", "1"])
    scenario = build_scenario(cfg)
    seen_splits = []
    real = SubnetEvaluator.choose_tau

    def spy(self, args, splits, *rest):
        seen_splits.append(splits)
        return real(self, args, splits, *rest)

    monkeypatch.setattr(SubnetEvaluator, "choose_tau", spy)
    import dataclasses

    from modkd_jax.data.scenarios import Split

    poisoned = Split(None, None, None)  # any read of a test split fails
    scenario = dataclasses.replace(scenario, tasks=tuple(dataclasses.replace(t, test=poisoned) for t in scenario.tasks))
    m = mind.setup(cli.mind_config(cfg), scenario)
    state = mind.init_state(m, jax.random.key(0))
    for t in range(2):
        state, info = mind.learn_task(m, state, t, jax.random.key(t), progress=False)
        assert float(state["tau"]) == info["tau"]
    assert [len(s) for s in seen_splits] == [1, 2]
    for splits in seen_splits:  # the validation rows placed once (m.val), never another split
        assert splits.x is m.val.x and splits.sizes == tuple(len(t.val.y) for t in scenario.tasks[:len(splits)])


def test_choose_tau_picks_the_best_and_breaks_ties_towards_one():
    from modkd_jax.subnet_eval import SubnetEvaluator

    grid = (0.5, 1.0, 2.0, 4.0)
    ev = SubnetEvaluator(None, 1, 2, (0.0,), (1.0,), None, 10)
    for correct, want in (([1, 3, 9, 2], 2.0), ([5, 5, 5, 5], 1.0), ([7, 2, 2, 7], 0.5)):
        ev.counts = lambda *args, c=correct, **kw: [({"cil_tau": np.asarray(c)}, 10)]
        tau, acc = ev.choose_tau((), None, 1, grid)
        assert tau == want and acc == {t: c / 10 for t, c in zip(grid, correct)}


def test_auto_temperature_without_validation_data_is_a_usage_error(tmp_path, capsys):
    assert cli.main(TINY + ["--val_fraction", "0", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "needs validation data" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "w").exists()


def test_paper_protocol_config_on_mock_cifar100():
    """`--task_count 10` is docs/mind.md's CIFAR-100 protocol, and trains on the whole training split."""
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = _cfg(["--task_count", "10"])
    m = cfg["mind"]
    assert cfg["dataset"] == "cifar100" and cfg["val_fraction"] == 0.0
    assert (m["arch"], m["epochs"], m["distill_epochs"], m["batch_size"]) == ("resnet32", 50, 50, 256)
    assert (m["lr"], list(m["lr_milestones"]), m["distill_lr"], list(m["distill_milestones"])) == (0.005, [0.7], 0.035, [0.8])
    assert (m["beta"], m["distill_loss"], m["distill_temperature"], m["temperature"]) == (5.0, "symkl", 1.0, 6.5)
    assert m["crop_flip"] and m["brightness"] == 63 / 255 and m["drop_last"] is False
    with tfds.testing.mock_data(num_examples=300):
        scenario = build_scenario(cfg)
        train = sum(len(t.train.y) for t in scenario.tasks)
    assert train == 300 and all(len(t.val.y) == 0 for t in scenario.tasks)  # whole training split, no validation


def test_copy_bn_row_starts_a_task_where_the_previous_one_ended():
    cfg = _cfg(TINY + ["--task_count", "2", "--arch", "resnet32"])
    m = mind.setup(cli.mind_config(cfg), build_scenario(cfg))
    state = mind.init_state(m, jax.random.key(0))
    bump = lambda x: x + jax.random.uniform(jax.random.key(1), x.shape)  # noqa: E731
    params = jax.tree.map(lambda p, kind: bump(p) if kind == masks.PER_TASK else p, state["params"], m.kinds)
    stats = jax.tree.map(bump, state["batch_stats"])
    new_params, new_stats = mind.copy_bn_row(params, m.kinds, stats, 1)
    per_task = [(a, b) for a, b, kind in zip(jax.tree.leaves(params), jax.tree.leaves(new_params),
                                             jax.tree.leaves(m.kinds)) if kind == masks.PER_TASK]
    assert per_task and len(jax.tree.leaves(stats)) > 0
    for before, after in per_task + list(zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats))):
        np.testing.assert_array_equal(after[1], before[0])
        np.testing.assert_array_equal(after[0], before[0])
        assert not np.array_equal(before[1], before[0])
    for before, after, kind in zip(jax.tree.leaves(params), jax.tree.leaves(new_params), jax.tree.leaves(m.kinds)):
        if kind != masks.PER_TASK:
            assert before is after


def test_flags_override_the_preset_and_each_other():
    """CIFAR-100's preset tau 6.5 gives way to --temperature auto; --no_augment wins over --crop_flip."""
    cfg = _cfg(["--temperature", "auto", "--no_augment", "--crop_flip", "--epochs", "3"])["mind"]
    assert cfg["temperature"] == "auto" and cfg["crop_flip"] is False and cfg["brightness"] == 0.0
    assert cfg["epochs"] == 3 and cfg["distill_epochs"] == 50  # a flag changes its own field only


def test_learning_rate_halves_at_every_milestone():
    """MultiStepLR with gamma 0.5 (the reference's): TinyImageNet's 100 epochs halve at 70 and at 90."""
    from modkd_jax import training

    lrs = [training.step_lr(0.005, e, 100, (0.7, 0.9)) for e in range(100)]
    assert lrs[:70] == [0.005] * 70 and lrs[70:90] == [0.0025] * 20 and lrs[90:] == [0.00125] * 10
    assert training.step_lr(1.0, 39, 50, 0.8) == 1.0 and training.step_lr(1.0, 40, 50, 0.8) == 0.5
    assert training.step_lr(1.0, 49, 50, ()) == 1.0
    with pytest.raises(ValueError, match="milestones"):
        mind.MindConfig(lr_milestones=(1.5,))
