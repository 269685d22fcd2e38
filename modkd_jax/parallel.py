"""Device meshes and data parallelism: the same jitted steps on one device, a GPU box or a TPU pod.

Nothing here is a second implementation of a step. A mesh has two axes,
``("agents", "data")``: batches are split along ``data``, parameters, owner
maps, masks and optimizer state are replicated, and the library's jitted
functions (``training.make_step``, ``subnet_eval.SubnetEvaluator``,
``routing.subnet_probs`` inside them) run unchanged under ``jax.jit`` sharding
annotations; XLA inserts the cross-device reductions. Batch-norm statistics are
therefore *global*: the batch mean in ``TaskBatchNorm`` is a mean over the
whole sharded batch, exactly as on one device. The ``agents`` axis (size 1 by
default) is room for decentralized runs that place one agent per mesh row::

    from modkd_jax import parallel, training
    mesh = parallel.make_mesh()                       # all devices on "data"
    step = parallel.data_parallel(training.make_step(loss_fn, tx), mesh)
    carry = parallel.replicate(mesh, carry)
    carry, metrics = step(carry, training.Batch(x, y), key, ctx)

``data_parallel`` splits the arguments named by ``batch_argnums`` (default:
the ``Batch`` of a train step) along ``data``, replicates every other one
and returns replicated outputs, so a carry keeps its layout from step to step
(no recompiles). The global batch must divide by the ``data`` axis size.

Multi-host (TPU pods, several GPU nodes): call
``maybe_initialize_distributed(True)`` first thing in every process (see its
docstring); every process draws the same global batch and ``shard_batch``
transfers only its own rows (``process_rows``) to assemble the global array.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AXES = ("agents", "data")


def maybe_initialize_distributed(enabled: bool, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None,
                                 **kwargs) -> bool:
    """Start JAX's multi-host runtime when ``enabled``; returns whether it was started.

    Call it once per process before any other JAX call. On Cloud TPU pods and
    on SLURM / Open MPI clusters ``jax.distributed.initialize()`` finds the
    coordinator, the process count and the process id itself, so run the same
    command on every host, e.g.
    ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python -m experiments.mind --distributed"``.
    Elsewhere pass the next three arguments or set their variables; arguments win over the variables.
    CPU collectives across processes use gloo unless ``jax_cpu_collectives_implementation`` was set.
    Afterwards ``jax.devices()`` lists every device of every host,
    ``make_mesh()`` spans them all, and ``shard_batch`` hands JAX each
    process's own rows of a batch.

    Args:
      enabled: start the runtime; False (single host) does nothing.
      coordinator_address: e.g. ``"host0:1234"``; else ``JAX_COORDINATOR_ADDRESS``, else found by JAX.
      num_processes: the process count N; else ``JAX_NUM_PROCESSES`` (jax itself does not read it), else found.
      process_id: this process's id in ``0..N - 1``; else ``JAX_PROCESS_ID`` (jax does not read it), else found.
      **kwargs: passed on to ``jax.distributed.initialize``.

    Raises:
        ValueError: a process count or id that is not an integer, or an id out of range.
    """
    if not enabled:
        return False
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _int_setting("JAX_NUM_PROCESSES", num_processes)
    process_id = _int_setting("JAX_PROCESS_ID", process_id)
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1}")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None}, **kwargs)
    return True


def distributed_running() -> bool:
    """Whether this process started JAX's multi-process runtime (``jax.distributed.initialize``)."""
    return jax.distributed.is_initialized()


def peer_failure(exc: BaseException) -> str | None:
    """One line saying that a computation across processes failed, if ``exc`` is that; else None.

    When a process dies (SIGKILL, a lost host) the others learn it at their next
    cross-process collective: gloo (CPU) or the accelerator runtime raise a
    ``JaxRuntimeError`` ("Connection closed by peer", ...). Any runtime error
    in a multi-process run is reported this way: the run cannot go on alone.
    """
    if not isinstance(exc, jax.errors.JaxRuntimeError) or not distributed_running():
        return None
    reason = str(exc).replace("Error dispatching computation: ", "").strip().splitlines()
    reason = " ".join(reason[0].split())[:300] if reason else type(exc).__name__
    return (f"process {jax.process_index()} of {jax.process_count()}: a computation across processes failed, "
            f"another process probably died ({reason}); re-run the same command on every process to resume "
            "after the last finished task")


def abandon(code: int) -> None:
    """End this process now, skipping JAX's distributed shutdown (after a peer died, that barrier can only wait
    out the heartbeat timeout and then abort with a C++ stack trace). Checkpoint saves are synchronous, so
    nothing on disk is left half written by skipping the interpreter's clean-up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _int_setting(variable: str, value: int | None) -> int | None:
    """``value``, else the integer in the environment ``variable``, else None."""
    if value is not None:
        return int(value)
    text = os.environ.get(variable)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not an integer") from None


def make_mesh(data: int | None = None, agents: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``("agents", "data")`` over ``devices`` (default: every device of every process).

    The first ``agents * data`` devices are used. Axes are ``Auto``: XLA propagates
    shardings from the annotations (plain ``jit``, no explicit-sharding types).

    Args:
      data: the size of the ``data`` axis (None: the device count divided by ``agents``).
      agents: the size of the ``agents`` axis.
      devices: the devices to use (None: ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if agents < 1:
        raise ValueError(f"agents must be at least 1, got {agents}")
    if data is None:
        data = len(devices) // agents
    if data < 1 or agents * data > len(devices):
        raise ValueError(f"a mesh of {agents} agents x {data} data needs {agents * data} devices, "
                         f"{len(devices)} available")
    grid = np.asarray(devices[:agents * data], dtype=object).reshape(agents, data)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, owner maps, masks, optimizer state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Axis ``axis`` (the batch axis: 0 for inputs, 1 for ``subnet_probs``' output) split along ``data``.

    Args:
      mesh: the mesh (``make_mesh``).
      axis: the array axis split over the ``data`` devices.
    """
    return NamedSharding(mesh, P(*([None] * axis), "data"))


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """``tree`` copied to every device of ``mesh`` (with several processes: from each process's own copy).

    Args:
      mesh: the mesh (``make_mesh``).
      tree: a pytree of arrays (and PRNG keys); every process must hold the same values.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)  # every process holds the same value (same seed, same computation)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(x) -> np.ndarray:
    """``x`` as a NumPy array on this host, also when its shards live on other processes' devices (then every
    process must call it: it gathers across processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _check_batch(x, size: int) -> None:
    if np.ndim(x) == 0:
        raise ValueError("a batch argument must have a leading batch axis, got a scalar")
    if np.shape(x)[0] % size:
        raise ValueError(f"batch of {np.shape(x)[0]} does not split over {size} devices along 'data'; "
                         f"use a batch size divisible by {size}")


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a global batch of ``shape`` that this process's devices hold under ``sharding``.

    Args:
      sharding: the batch's sharding (``batch_sharding``: split along the leading axis).
      shape: the global batch's shape.

    Returns:
      One slice of the leading axis.
    """
    starts, stops = zip(*((idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
                          for idx in sharding.addressable_devices_indices_map(shape).values()))
    return slice(min(starts), max(stops))


def shard_batch(mesh: Mesh, tree: PyTree) -> PyTree:
    """Every array of the global batch ``tree`` split along its leading axis over ``data``.

    Each process hands JAX only the rows its own devices hold (``process_rows``,
    ``jax.make_array_from_process_local_data``), so each host transfers 1/N of every
    batch and the global batch is the 1-process one.

    Args:
      mesh: the mesh (``make_mesh``).
      tree: the global batch, the same in every process (the same seed draws the same batches everywhere);
        leading axes must divide by the ``data`` axis size.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        _check_batch(x, mesh.shape["data"])
        if jax.process_count() > 1:
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(sharding, x[process_rows(sharding, x.shape)], x.shape)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def _placed(tree: PyTree, sharding: NamedSharding) -> bool:
    """Whether every leaf of ``tree`` is a ``jax.Array`` already laid out as ``sharding`` (nothing to transfer)."""
    return all(isinstance(x, jax.Array) and x.sharding == sharding for x in jax.tree.leaves(tree))


class DataParallel:
    """A jitted function of this library made data-parallel on a mesh (see ``data_parallel``).

    Args:
      fn: the function, as ``jax.jit`` would take it.
      mesh: the mesh (``make_mesh``).
      batch_argnums: positions of the arguments split along ``data``.
      donate_argnums: positions of the arguments donated.
      out_shardings: the outputs' shardings (None: replicated).
    """

    def __init__(self, fn: Callable, mesh: Mesh, batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                 out_shardings: PyTree):
        self.fn, self.mesh = fn, mesh
        self.batch_argnums, self.donate_argnums = tuple(batch_argnums), tuple(donate_argnums)
        self.out_shardings = replicated(mesh) if out_shardings is None else out_shardings
        self._replicated, self._batch = replicated(mesh), batch_sharding(mesh)
        self._compiled: dict[tuple[int, bool], Callable] = {}

    @property
    def devices(self) -> int:
        """Devices on the ``data`` axis (whole batches are multiples of it)."""
        return self.mesh.shape["data"]

    def _splits(self, args) -> bool:
        leaves = [x for i in self.batch_argnums if i < len(args) for x in jax.tree.leaves(args[i])]
        return all(np.ndim(x) > 0 and np.shape(x)[0] % self.devices == 0 for x in leaves)

    def _jitted(self, n: int, split: bool) -> Callable:
        """The jitted function for ``n`` arguments, batch arguments split or not (built once)."""
        if (n, split) not in self._compiled:
            shardings = tuple(self._batch if split and i in self.batch_argnums else self._replicated for i in range(n))
            self._compiled[(n, split)] = jax.jit(self.fn, in_shardings=shardings, out_shardings=self.out_shardings,
                                                 donate_argnums=tuple(i for i in self.donate_argnums if i < n))
        return self._compiled[(n, split)]

    def _place(self, arg: PyTree, batch: bool) -> PyTree:
        """``arg`` split along ``data`` (``batch``) or on every device; as it is if already laid out so.

        Arrays already placed pass through untouched (no device_put, no copy, so donation still reuses their
        buffers): a carry returned by the previous call and arguments placed once cost one check per leaf.
        """
        if _placed(arg, self._batch if batch else self._replicated):
            return arg
        return shard_batch(self.mesh, arg) if batch else replicate(self.mesh, arg)

    def _prepare(self, args):
        n, split = len(args), self._splits(args)
        return self._jitted(n, split), [self._place(a, split and i in self.batch_argnums) for i, a in enumerate(args)]

    def __call__(self, *args):
        jitted, args = self._prepare(args)
        return jitted(*args)

    def lower(self, *args):
        """The lowered program for these arguments (``.compile().as_text()`` shows the collectives)."""
        jitted, args = self._prepare(args)
        return jitted.lower(*args)

    def compiled_count(self) -> int:
        """Programs compiled so far (one per distinct argument signature: recompiles show up here)."""
        return sum(jitted._cache_size() for jitted in self._compiled.values())


def data_parallel(fn: Callable, mesh: Mesh, batch_argnums: Sequence[int] = (1,),
                  donate_argnums: Sequence[int] = (0,), out_shardings: PyTree = None) -> DataParallel:
    """``fn`` (a jitted step or evaluator of this library) data-parallel on ``mesh``.

    ``fn`` runs unchanged: this is ``jax.jit`` with sharding
    annotations, and the reductions over the batch (losses, gradients, batch-norm
    statistics) become global reductions across the mesh. A batch that does not
    split evenly over ``data`` (an epoch's last partial batch) runs replicated:
    every device computes it whole, so the result is the single-device one.

    Args:
      fn: the function (its plain, unjitted form or a jitted one).
      mesh: the mesh (``make_mesh``).
      batch_argnums: positional arguments (arrays or pytrees of arrays) split along ``data`` (their leading
        axis); all others are replicated.
      donate_argnums: positional arguments whose buffers are donated (a train step's carry).
      out_shardings: a pytree prefix of ``NamedSharding`` for the outputs (None: replicated).
    """
    return DataParallel(fn, mesh, batch_argnums, donate_argnums, out_shardings)


def devices_of(fn: Callable) -> int:
    """The data-parallel width of a step or counts function: its devices, or 1 for a plain jitted one."""
    return fn.devices if isinstance(fn, DataParallel) else 1


def constrain_batch(mesh: Mesh, tree: PyTree) -> PyTree:
    """Inside a compiled function: every array of ``tree`` split along its leading axis over ``data`` (a batch
    gathered on the device from replicated rows; each device computes its share).

    Args:
      mesh: the mesh (``make_mesh``).
      tree: the batch's arrays (traced).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)
