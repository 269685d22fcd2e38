"""One process of a 2-process x 2-CPU-device run: start-up from env vars or arguments, then one global reduction.

Usage: ``python tests/distributed_check.py PROCESS_ID PORT env|args`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (set by the test).
Prints ``process P of N: D devices, L local, sum S``.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modkd_jax import parallel  # noqa: E402


def main() -> int:
    pid, port, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if how == "env":  # the variables jax itself does not read (JAX_NUM_PROCESSES, JAX_PROCESS_ID)
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=str(pid))
        parallel.maybe_initialize_distributed(True)
    else:
        parallel.maybe_initialize_distributed(True, f"127.0.0.1:{port}", 2, pid)
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh = parallel.make_mesh()
    rows = np.full((2, 3), pid + 1.0, np.float32)  # this process's rows of a global (4, 3) batch
    batch = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), rows)
    total = jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))(batch)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"{jax.local_device_count()} local, global batch {batch.shape}, sum {float(total)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
