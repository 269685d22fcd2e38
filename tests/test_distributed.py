"""Multi-process on localhost: 2 processes x 2 CPU devices form one 4-device mesh (gloo) and train as 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import mind as cli
from modkd_jax import parallel

CHECK = Path(__file__).resolve().parent / "distributed_check.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["env", "args"])
def test_two_processes_form_one_four_device_mesh(how):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(CHECK), str(i), str(port), how], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    for i, (out, _) in enumerate(outs):
        # each process fed 2 rows of its own (value i + 1); the sum over the global batch needs both
        assert f"process {i} of 2: 4 devices, 2 local, global batch (4, 3), sum 18.0" in out, out


def test_bad_process_settings_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    argv = ["--dataset", "digits", "--task_count", "2", "--workdir", str(tmp_path / "w")]
    assert cli.main(argv + ["--num_processes", "2", "--process_id", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "process id 2 is not in 0..1" in err
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    assert cli.main(argv + ["--distributed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "JAX_NUM_PROCESSES='two' is not an integer" in err
    assert not (tmp_path / "w").exists()
    assert parallel.maybe_initialize_distributed(False) is False


MP_CHECK = Path(__file__).resolve().parent / "multiprocess_check.py"


def test_two_processes_train_mind_and_ewc_to_the_one_process_matrices(tmp_path):
    """2 processes x 2 devices = 1 process x 4 devices, each process handing JAX only its half of every batch."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.run([sys.executable, str(MP_CHECK), str(tmp_path / "single.json"), "single"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(MP_CHECK), str(tmp_path / "multi.json"), str(i), str(port)],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "multi.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["fed"] and all(2 * local == whole for local, whole in two["fed"])  # each process: half the rows
    for method, matrices in one["results"].items():
        for rule, R in matrices.items():
            np.testing.assert_array_equal(np.asarray(two["results"][method][rule], float), np.asarray(R, float),
                                          err_msg=f"{method} {rule}")
