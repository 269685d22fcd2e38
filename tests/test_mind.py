"""MIND end to end: the CLI on real data, resume, bad input, exported sub-networks, the CIFAR-100 path."""

import json

import jax
import numpy as np
import pytest

from experiments import mind as cli
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


def test_resume_gives_the_same_results_as_an_uninterrupted_run(tmp_path):
    cfg = _cfg(TINY + ["--epochs", "2", "--distill_epochs", "2"])
    whole = cli.run(cfg, tmp_path / "whole")
    part = cli.run(cfg, tmp_path / "part", stop_after=2)
    assert part["tasks_done"] == 2
    messages = []
    resumed = cli.run(cfg, tmp_path / "part", echo=messages.append)
    assert any("resuming" in m and "after task 1" in m for m in messages)
    for rule in ("til", "cil", "cil_entropy"):
        np.testing.assert_array_equal(np.asarray(resumed["accuracy_matrix"][rule]),
                                      np.asarray(whole["accuracy_matrix"][rule]))
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert sum('"summary"' in line for line in lines) == 5  # no duplicated task lines


def test_same_seed_same_accuracy_matrix(tmp_path):
    cfg = _cfg(TINY + ["--task_count", "2", "--epochs", "1", "--distill_epochs", "1"])
    a, b = cli.run(cfg, tmp_path / "a"), cli.run(cfg, tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(a["accuracy_matrix"]["cil"]), np.asarray(b["accuracy_matrix"]["cil"]))


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
    scenario = cli.build_scenario(cfg)
    method = mind.setup(mind.MindConfig(**{**cfg["mind"], "hidden": tuple(cfg["mind"]["hidden"])}), scenario)
    state = mind.init_state(method, jax.random.key(0))
    for t in range(2):
        state, _ = mind.learn_task(method, state, t, jax.random.key(t + 1), progress=False)
    spec = {"arch": "mlp", "hidden": list(cfg["mind"]["hidden"]), "num_outputs": 10, "num_tasks": 2, "block_size": 5}
    checkpoint.export_subnetwork(tmp_path / "sub0", state["params"], state["batch_stats"], state["owner"], 0, spec)
    spec2, item = checkpoint.load_subnetwork(tmp_path / "sub0")
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


@pytest.mark.parametrize("extra", [
    ["--self_distillation"],
    ["--policy", "magnitude", "--init_new", "keep"],
    ["--scenario", "permuted"],
], ids=["self_distillation", "magnitude", "permuted"])
def test_variants_learn_every_task_without_forgetting(tmp_path, extra):
    argv = ["--dataset", "digits", "--task_count", "2", "--epochs", "4", "--distill_epochs", "4"] + extra
    res = cli.run(_cfg(argv), tmp_path / "run")
    til = np.asarray(res["accuracy_matrix"]["til"], float)
    assert np.all(np.diag(til) > 0.85), til
    assert til[1, 0] == til[0, 0]  # task 0's sub-network is untouched by task 1
    if "--self_distillation" in extra:
        assert res["method"] == "mind_self_distillation" and res["config"]["mind"]["policy"] == "magnitude"
