"""One conformance test over every method on the one contract (``modkd_jax.learner`` + ``modkd_jax.loop``).

For each method, on a tiny digits sequence: a run stopped after task 1 and
resumed from its run directory gives the uninterrupted run's matrices and
results (all but times and compile counts) bit for bit; there is one
checkpoint step per finished task; results.json has the one schema. A process killed (SIGKILL) between tasks resumes to the same matrices;
every CLI answers bad input with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modkd_jax import data, loop, rundir
from modkd_jax.methods import baselines, mind

REPO = Path(__file__).resolve().parents[1]
TASKS = 2


def _scenario(task_count: int = TASKS, val_fraction: float = 0.1):
    return data.build("class_split", data.load("digits"), task_count, seed=0, val_fraction=val_fraction)


def _mind(self_distillation: bool = False):
    cfg = mind.MindConfig(arch="mlp", hidden=(32, 32), epochs=1, distill_epochs=1, batch_size=32, lr=1e-3,
                          distill_lr=5e-3, temperature=None, crop_flip=False, self_distillation=self_distillation,
                          policy="magnitude" if self_distillation else "random")
    return mind.learner(cfg, _scenario())


def _baseline(method: str):
    cfg = baselines.BaselineConfig(method=method, arch="mlp", hidden=(32, 32), epochs=1, retrain_epochs=1,
                                   batch_size=32, lr=1e-3, crop_flip=False, ewc_samples=64)
    return baselines.learner(cfg, _scenario())


def _experts():
    from modkd_jax.methods import experts

    cfg = experts.ExpertsConfig(hidden=(16, 16), embed_dim=16, prototypes=4, epochs=1, batch_size=32)
    return experts.learner(cfg, _scenario())


def _dkt():
    from modkd_jax.methods import dkt

    cfg = dkt.DKTConfig(agents=2, hidden=(16, 16), epochs=2, batch_size=32, n_probe=64, lr=2e-3, eval_batch_size=360)
    return dkt.learner(dkt.setup(cfg, data.load("digits"), TASKS, seed=0))


def _collective():
    """Two MIND agents dealt 5 tasks (3 rounds), their students distilled from the exchanged tables."""
    from modkd_jax.methods import collective

    cfg = collective.CollectiveConfig(agents=2, task_count=5, n_probe=64, student_hidden=(16,), student_epochs=1,
                                      joint_epochs=1, batch_size=32, eval_batch_size=360)
    agent = mind.preset_config("digits", epochs=1, distill_epochs=1, hidden=(16, 16))
    return collective.learner(collective.setup(cfg, data.load("digits"), agent, seed=0))


def _split_backbone():
    """Setting 1 on two 16 px digits subsets (as experiments.ocl builds its sequence), ImageNet stem, random init."""
    import dataclasses

    from experiments import ocl
    from modkd_jax.methods import split_backbone

    digits = data.load("digits")
    sets = [dataclasses.replace(ocl.subset(digits, 64, 32, seed), name=f"digits_{seed}") for seed in range(TASKS)]
    scenario = data.dataset_sequence(sets, shape=(16, 16, 3), seed=0, val_fraction=0.0)
    cfg = split_backbone.OCLConfig(split="6.5-2.3-2.4", batch_size=32, stem_mode="imagenet", eval_batch=32)
    return split_backbone.learner(cfg, scenario)


BUILDERS = {
    "mind": _mind, "mind_self_distillation": lambda: _mind(True),
    **{m: (lambda m=m: _baseline(m)) for m in baselines.METHODS},
    "experts": _experts, "dkt": _dkt, "collective": _collective, "split_backbone": _split_backbone,
}
TIMING = {"seconds", "seconds_per_task", "train_seconds", "compiles"}  # the machine's, not the run's


def _untimed(tree):
    """Results as results.json holds them, without wall-clock times and compile counts."""
    if isinstance(tree, dict):
        return {k: _untimed(v) for k, v in tree.items() if k not in TIMING}
    return [_untimed(v) for v in tree] if isinstance(tree, list) else tree


SCHEMA_KEYS = {"schema", "method", "config", "tasks", "classes", "tasks_done", "rules", "lead_axes", "accuracy_matrix",
               "final", "summary", "seconds_per_task", "task_infos", "params"}


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_method_follows_the_contract(method, tmp_path):
    try:
        learner = BUILDERS[method]()
    except (ImportError, AttributeError) as exc:  # a method not yet on the contract fails loudly, never skips
        pytest.fail(f"{method} has no Learner: {exc}")
    cfg = {"seed": 0, "method": method}
    whole = loop.run(learner, cfg, None, echo=None)
    T = learner.task_count
    part = loop.run(learner, cfg, tmp_path, stop_after=1, echo=None)
    assert part["tasks_done"] == 1
    lines = []
    resumed = loop.run(learner, cfg, tmp_path, echo=lines.append)
    assert any("after task 0" in line for line in lines)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(1, T + 1))  # one checkpoint step per task
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk) >= SCHEMA_KEYS and on_disk["schema"] == loop.SCHEMA and on_disk["tasks_done"] == T
    assert set(on_disk["rules"]) <= set(on_disk["accuracy_matrix"])
    for rule, R in whole["accuracy_matrix"].items():
        R = np.asarray(R, float)
        assert R.shape[-2:] == (T, T) and R.shape[:-2] == tuple(np.shape(R)[:len(learner.lead_axes)])
        np.testing.assert_array_equal(np.asarray(resumed["accuracy_matrix"][rule], float), R, err_msg=rule)
        np.testing.assert_array_equal(np.asarray(on_disk["accuracy_matrix"][rule], float), R, err_msg=rule)
    # everything else too: task infos, the method's report (bytes sent, tables, ...), parameter counts
    assert _untimed(on_disk) == _untimed(rundir.jsonable(whole)) == _untimed(rundir.jsonable(resumed))
    til = np.asarray(whole["accuracy_matrix"][learner.rules[0]], float)
    assert np.all(np.isfinite(np.diagonal(til, axis1=-2, axis2=-1)))  # every task evaluated when learnt


MIND_CLI = ["-m", "experiments.mind", "--dataset", "digits", "--task_count", "2", "--epochs", "1",
            "--distill_epochs", "1", "--batch_size", "32"]


def test_killed_between_tasks_resumes_to_the_uninterrupted_matrices(tmp_path):
    """SIGKILL right after task 1's checkpoint (no clean shutdown; the process kills itself there,
    tests/killed_run.py, so no timing decides where), then the same command: same matrices as one go in a third
    process (so also: same seed, same numbers across processes), and each task's summary in metrics.jsonl once."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, *MIND_CLI, "--workdir", str(tmp_path / "killed")]
    killed = subprocess.run([sys.executable, str(Path(__file__).with_name("killed_run.py")), *MIND_CLI[2:],
                             "--workdir", str(tmp_path / "killed")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "1").is_dir(), "no checkpoint was written"
    assert not (tmp_path / "killed" / "checkpoints" / "2").exists()  # it died right after task 1
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "after task 0" in again.stdout
    whole = subprocess.run([sys.executable, *MIND_CLI, "--workdir", str(tmp_path / "whole")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a = json.loads((tmp_path / "killed" / "results.json").read_text())["accuracy_matrix"]
    b = json.loads((tmp_path / "whole" / "results.json").read_text())["accuracy_matrix"]
    assert set(a) == set(b) >= {"til", "cil", "task_id"}
    for rule in b:
        np.testing.assert_array_equal(np.asarray(a[rule], float), np.asarray(b[rule], float), err_msg=rule)
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines if line.get("phase") == "summary"] == [0, 1]


BAD_INPUT = {
    "experiments.mind": ["--dataset", "digits", "--epochs", "0"],
    "experiments.baselines": ["--method", "ewc", "--dataset", "digits", "--epochs", "0"],
    "experiments.dkt": ["--dataset", "digits", "--epochs", "0"],
    "experiments.experts": ["--dataset", "digits", "--epochs", "0"],
    "experiments.ocl": ["--datasets", "mnist"],
}


@pytest.mark.parametrize("module", sorted(BAD_INPUT))
def test_every_cli_answers_bad_input_with_one_line_and_exit_2(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, *BAD_INPUT[module], "--workdir", str(tmp_path / "w")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:"), out.stderr
    assert not (tmp_path / "w" / "results.json").exists()


def test_four_device_mesh_gives_the_one_device_matrices_for_every_mesh_method():
    """MIND, its self-distillation variant and the five baselines (tests/mesh_check.py, its own process)."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "mesh_check.py")], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("4 devices = 1 device") == 2 + len(baselines.METHODS)


def test_presets_hold_only_known_settings():
    """Every preset builds its config; a key that is neither a field nor a run setting is refused, not dropped."""
    from modkd_jax.methods import dkt, experts, from_preset

    for dataset in mind.PRESETS:
        mind.preset_config(dataset)
    for dataset in experts.PRESETS:
        experts.preset_config(dataset)
    for dataset in dkt.PRESETS:
        from_preset(dkt.DKTConfig, dkt.PRESETS[dataset])
    for dataset in ("mnist", "digits"):
        from_preset(baselines.BaselineConfig, baselines.preset(dataset))
    with pytest.raises(ValueError, match="unknown MindConfig setting.*epochz"):
        from_preset(mind.MindConfig, {**mind.PRESETS["mnist"], "epochz": 3})
    with pytest.raises(ValueError, match="unknown MindConfig setting.*distil_lr"):
        mind.preset_config("mnist", distil_lr=0.1)
