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


def test_batch_that_does_not_split_over_the_devices_is_one_clear_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false")
    bad = subprocess.run([sys.executable, "-m", "experiments.mind", "--dataset", "digits", "--task_count", "2",
                          "--batch_size", "30", "--workdir", str(tmp_path / "bad")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "does not split over 4 devices" in bad.stderr and "Traceback" not in bad.stderr
