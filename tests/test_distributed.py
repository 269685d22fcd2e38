"""Multi-process start-up on localhost: 2 processes x 2 CPU devices form one 4-device mesh (gloo collectives)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

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
