"""MIND's CLI on a 4-device CPU mesh refuses a batch that does not split over the devices in one line.

The 4-device = 1-device matrices (every rule) are checked in tests/mesh_check.py, and the CLI on 2 processes x 2
devices = 1 process x 4 devices in tests/test_distributed.py. The run is its own process: the device count
(XLA_FLAGS) is fixed before JAX starts.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["-m", "experiments.mind", "--dataset", "digits", "--task_count", "2", "--arch", "mlp", "--epochs", "2",
        "--distill_epochs", "2", "--batch_size", "32", "--optimizer", "sgd", "--lr", "0.05", "--distill_lr", "0.05"]


def _run(workdir: Path, devices: int, extra=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false")
    return subprocess.run([sys.executable, *ARGS, "--workdir", str(workdir), *extra], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_batch_that_does_not_split_over_the_devices_is_one_clear_line(tmp_path):
    bad = _run(tmp_path / "bad", 4, ["--batch_size", "30"])
    assert bad.returncode == 2
    assert "does not split over 4 devices" in bad.stderr and "Traceback" not in bad.stderr
