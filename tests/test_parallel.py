"""Data parallelism: 1 device vs an 8-device CPU mesh (in a subprocess), and the mesh helpers' contracts."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import parallel

CHECK = Path(__file__).with_name("parallel_check.py")


def test_eight_device_mesh_matches_one_device():
    """MIND teacher step, distillation step and CIL inference agree on 1 and 8 devices; BN stats are global."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("OK")
    for check in ("teacher params", "distill params", "sub-network evaluator (map), 1 vs 8", "subnet_probs vmap",
                  "BN statistics are global", "gradients all-reduced"):
        assert check in proc.stdout, check


def test_mesh_axes_and_sizes():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("agents", "data")
    assert dict(mesh.shape) == {"agents": 1, "data": jax.device_count()}
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs {n + 1} devices, {n} available"):
        parallel.make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="agents must be at least 1"):
        parallel.make_mesh(agents=0)


def test_batch_that_does_not_split_is_refused_with_a_clear_message():
    mesh = parallel.make_mesh()
    if mesh.shape["data"] == 1:  # a one-device mesh splits everything; use a fake 2-way check instead
        with pytest.raises(ValueError, match="does not split over 2 devices"):
            parallel._check_batch(np.zeros((3, 4)), 2)
    else:
        with pytest.raises(ValueError, match="does not split"):
            parallel.shard_batch(mesh, np.zeros((mesh.shape["data"] + 1, 4)))
    with pytest.raises(ValueError, match="leading batch axis"):
        parallel._check_batch(np.float32(1.0), 2)


def test_data_parallel_on_one_device_is_the_plain_step():
    """On a 1-device mesh the wrapped function gives the plain function's results and keeps one compilation."""
    mesh = parallel.make_mesh(data=1)

    @jax.jit
    def step(w, x, y):
        g = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
        return w - 0.1 * g, jnp.mean(x)

    wrapped = parallel.data_parallel(step, mesh, batch_argnums=(1, 2), donate_argnums=())
    x, y, w = np.ones((4, 3), np.float32), np.ones((4,), np.float32), jnp.zeros(3)
    for _ in range(2):
        got, _ = wrapped(w, x, y)
        want, _ = step(w, x, y)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        w = got
    assert wrapped.compiled_count() == 1
    assert got.sharding.is_fully_replicated


def test_distributed_start_is_off_unless_asked():
    assert parallel.maybe_initialize_distributed(False) is False
