"""The benchmark scripts run end to end at toy sizes (no timing is asserted: speed lives in their output)."""

from pathlib import Path

from benchmarks import accuracy, distill_grad, inference, scaling, train_step
from benchmarks import task_inference as task_inference_bench


def test_inference_contenders_agree_and_report_the_speed_up(capsys):
    assert inference.main(["--archs", "mlp", "--tasks", "2", "--batch_size", "8", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "speed-up of one call (map) over the loop of T jits, mlp: T=2" in out


def test_scaling_memory_and_steps_on_the_mlp(capsys):
    assert scaling.main(["--arch", "mlp", "--tasks", "2,4", "--batch_size", "8", "--rounds", "1", "--steps", "1",
                         "--skip", "devices"]) == 0
    out = capsys.readouterr().out
    assert "owner maps" in out and "vs 2 tasks" in out


def test_train_step_refuses_bad_sizes(capsys):
    assert train_step.main(["--tasks", "3"]) == 2
    assert "--tasks >" in capsys.readouterr().err


def test_accuracy_report_rebuilds_from_saved_json(tmp_path):
    """The committed raw results rebuild the committed table (docs/results.md comes from it)."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    out = tmp_path / "report"
    assert accuracy.main(["--from_json", str(results / "accuracy_quick.json"), "--out", str(out)]) == 0
    rows = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    rebuilt = (out / "accuracy_quick.md").read_text()
    assert "Welch" in rebuilt
    assert rows(rebuilt) == rows((results / "accuracy_quick.md").read_text())


def test_distill_grad_shows_the_paper_term_pulling_harder_than_the_old_one(capsys):
    assert distill_grad.main(["--dataset", "digits", "--epochs", "2", "--batch_size", "32"]) == 0
    out = capsys.readouterr().out
    ratios = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 8 and cells[2] == "start of distillation":
            ratios[cells[1]] = float(cells[6])
    assert ratios["paper: L_SD (symmetric KL) at T = 1"] > 10 * ratios["before: Jensen-Shannon at tau = 6.5"]


def test_task_inference_table_has_every_rule_and_the_rule_in_use(tmp_path):
    from modkd_jax import data, loop, task_inference
    from modkd_jax.methods import mind

    scenario = data.build("class_split", data.load("digits"), 5, seed=0, val_fraction=0.1)
    cfg = mind.preset_config("digits", epochs=1, distill_epochs=1, hidden=(16, 16),
                             inference=task_inference.InferenceConfig(gauss_components=2, gauss_rank=4,
                                                                          report_rules="all"))
    loop.run(mind.learner(cfg, scenario), {"seed": 0}, tmp_path / "run", echo=None)
    rows = task_inference_bench.table("split_mnist", [tmp_path / "run"], {}).splitlines()
    for rule in task_inference.SUBNET_RULES:
        assert sum(line.startswith(f"| {rule} |") for line in rows) == 1, rule
    assert any(line.startswith("| **auto** (chose ") for line in rows)


def test_accelerator_script_keeps_going_after_a_failed_part(tmp_path, monkeypatch, capsys):
    """The lent-device script: command line and banner on top, a failing part reported, the next part still run
    (real parts compile ResNet-32 for minutes; ``python -m benchmarks.accelerator --quick`` runs them)."""
    from benchmarks import accelerator

    def broken(sizes):
        raise RuntimeError("out of device memory\nmore detail")

    monkeypatch.setattr(accelerator, "PARTS", (("broken", broken), ("fine", lambda sizes: ["fine table"])))
    out = tmp_path / "acc.txt"
    assert accelerator.main(["--quick", "--out", str(out)]) == 1
    text = out.read_text()
    assert text.startswith(f"$ python -m benchmarks.accelerator --quick --out {out}\njax ")
    assert "1. broken FAILED: RuntimeError: out of device memory\n" in text and "more detail" not in text
    assert "fine table" in text and "1 part(s) failed" in text
