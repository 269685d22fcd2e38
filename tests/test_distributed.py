"""Multi-process on localhost: 2 processes x 2 CPU devices form one 4-device mesh (gloo) and train as 1 process."""

import json
import os
import socket
import subprocess
import sys
import time
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
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    assert cli.main(argv + ["--distributed", "--heartbeat_timeout", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--heartbeat_timeout must be at least 1 second" in err
    assert not (tmp_path / "w").exists()
    assert parallel.maybe_initialize_distributed(False) is False


MP_CHECK = Path(__file__).resolve().parent / "multiprocess_check.py"


def _one_and_two(script: Path, tmp_path: Path, single: str) -> tuple[dict, dict]:
    """``script``'s JSON record run as one process (mode ``single``) and as 2 processes x 2 devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json"), single], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "two.json"), str(i), str(port)],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return tuple(json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))


def test_two_processes_train_ewc_to_the_one_process_matrices(tmp_path):
    """2 processes x 2 devices = 1 process x 4 devices, each process handing JAX only its half of every batch
    (EWC: its Fisher pass too; MIND: the CLI test below)."""
    one, two = _one_and_two(MP_CHECK, tmp_path, "single")
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["fed"] and all(2 * local == whole for local, whole in two["fed"])  # each process: half the rows
    for method, matrices in one["results"].items():
        for rule, R in matrices.items():
            np.testing.assert_array_equal(np.asarray(two["results"][method][rule], float), np.asarray(R, float),
                                          err_msg=f"{method} {rule}")


DKT_CHECK = Path(__file__).resolve().parent / "dkt_multiprocess_check.py"


def test_dkt_agents_across_two_processes_equal_the_vmapped_run(tmp_path):
    """4 DKT agents on an agents axis spanning 2 processes x 2 devices (the ring's ppermute crosses processes)
    give the matrices and bytes of the same run vmapped in one process."""
    a, b = _one_and_two(DKT_CHECK, tmp_path, "vmapped")
    assert a["processes"] == 1 and b["processes"] == 2
    assert a["bytes"] == b["bytes"] and min(a["bytes"]) > 0
    for rule, R in a["R"].items():
        np.testing.assert_array_equal(np.asarray(b["R"][rule], float), np.asarray(R, float), err_msg=rule)


RUN = Path(__file__).resolve().parent / "multihost_run.py"


def _start(workdir: Path, devices: int, *, port: int | None = None, process_id: int | None = None,
           stop_after: str = "-", stuck_at: str = "-") -> subprocess.Popen:
    """One process of the MIND CLI run of ``multihost_run.py`` (1 process, or process ``process_id`` of 2)."""
    flags = [] if port is None else ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                     "--process_id", str(process_id)]
    return subprocess.Popen([sys.executable, str(RUN), str(workdir), str(devices), stop_after, stuck_at, *flags],
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _two(workdir: Path, **kw) -> list[subprocess.Popen]:
    """The same command in 2 processes x 2 CPU devices (``kw`` per process: ``stop_after``, ``stuck_at``)."""
    port = _free_port()
    return [_start(workdir, 2, port=port, process_id=i, **{k: v[i] for k, v in kw.items()}) for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Wait for every process; each must exit 0. Returns their stdout."""
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def _matrices(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())["accuracy_matrix"]


def test_two_process_cli_run_checkpoints_resumes_and_survives_a_killed_process(tmp_path):
    """The MIND CLI on 2 processes x 2 devices with a workdir, as a pod runs it.

    1. stopped cleanly after task 1 (every process saves the orbax step, process 0 alone writes the run files);
    2. re-run: both resume from step 1; process 1 then hangs in task 2 and is SIGKILLed: process 0 ends with one
       ``error:`` line (exit 3) instead of waiting for its peer;
    3. re-run: both resume from step 1 again and finish with exactly (bit for bit, SGD) the accuracy matrices
       of the uninterrupted 1-process x 4-device run, every candidate rule of ``auto`` fitted across processes.
    """
    single = _start(tmp_path / "one", 4)  # the reference, alongside phase 1
    work = tmp_path / "two"
    _finish(_two(work, stop_after=("1", "1")))
    _finish([single])
    part = json.loads((work / "results.json").read_text())
    assert part["tasks_done"] == 1 and sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1"]
    reference = _matrices(tmp_path / "one")
    for rule, R in reference.items():  # task 1 trained on 2 processes = on 1 process
        np.testing.assert_array_equal(np.asarray(part["accuracy_matrix"][rule], float)[0],
                                      np.asarray(R, float)[0], err_msg=rule)

    procs = _two(work, stuck_at=("-", "1"))
    marker = Path(str(work) + ".stuck")
    deadline = time.monotonic() + 600  # a generous bound on the wait, not a measurement
    while not marker.exists():  # process 1 reached task 2 (after resuming); process 0 is training it
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        assert time.monotonic() < deadline, "process 1 never reached task 2"
        time.sleep(0.5)
    procs[1].kill()
    procs[1].wait(timeout=600)
    out, err = procs[0].communicate(timeout=600)  # bounded: no waiting for the dead peer
    assert procs[0].returncode == 3, err[-3000:]
    assert "resuming" in out and "after task 0" in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another process probably died" in errors[0], err[-3000:]
    assert "re-run the same command on every process" in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1"]

    marker.unlink()
    outs = _finish(_two(work))
    assert all("resuming" in out and "after task 0" in out for out in outs), outs
    got = _matrices(work)
    assert got.keys() == reference.keys()
    chosen = [json.loads((d / "results.json").read_text())["task_inference"] for d in (work, tmp_path / "one")]
    assert chosen[0]["rule_in_use"] == chosen[1]["rule_in_use"] and len(chosen[0]["rule_in_use"]) == 2
    assert chosen[0]["val_task_id"] == chosen[1]["val_task_id"]  # auto's scores on validation, every candidate
    for rule, R in reference.items():
        np.testing.assert_array_equal(np.asarray(got[rule], float), np.asarray(R, float), err_msg=rule)
    summaries = [json.loads(line)["task"] for line in (work / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("phase") == "summary"]
    assert summaries == [0, 1]  # one writer: each task's summary once, the killed attempt's lines dropped
