"""MIND's CLI data-parallel on a 4-device CPU mesh gives the single-device run's accuracy matrices.

Each run is its own process: the device count (XLA_FLAGS) is fixed before JAX starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARGS = ["-m", "experiments.mind", "--dataset", "digits", "--task_count", "2", "--arch", "mlp", "--epochs", "2",
        "--distill_epochs", "2", "--batch_size", "32", "--optimizer", "sgd", "--lr", "0.05", "--distill_lr", "0.05",
        "--report_rules", "all"]  # every rule through the mesh


def _run(workdir: Path, devices: int, extra=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false")
    return subprocess.run([sys.executable, *ARGS, "--workdir", str(workdir), *extra], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_four_device_run_equals_one_device_run(tmp_path):
    one, four = _run(tmp_path / "one", 1), _run(tmp_path / "four", 4)
    assert one.returncode == 0, one.stderr[-2000:]
    assert four.returncode == 0, four.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())["accuracy_matrix"]
    b = json.loads((tmp_path / "four" / "results.json").read_text())["accuracy_matrix"]
    for rule in ("til", "cil", "task_id", "cil_top2_entropy", "cil_gauss_input"):  # gradients and BN statistics summed in another order: ~1e-7
        np.testing.assert_allclose(np.asarray(b[rule], float), np.asarray(a[rule], float), atol=0.02, err_msg=rule)
    assert np.mean(np.asarray(a["til"], float)[-1]) > 0.9  # both tasks learnt


def test_batch_that_does_not_split_over_the_devices_is_one_clear_line(tmp_path):
    bad = _run(tmp_path / "bad", 4, ["--batch_size", "30"])
    assert bad.returncode == 2
    assert "does not split over 4 devices" in bad.stderr and "Traceback" not in bad.stderr
