"""Several hosts: ``jax.distributed`` from the environment, the main process, and each host's slice of the data.

Every host runs the same program (JAX's multi-controller model). ``initialize_from_env`` must run before anything
touches a device. Then ``jax.devices()`` lists every device of every host, a mesh spans all of them, and each host
feeds only the rows of the global batch its own devices hold (``host_rows`` / ``host_local_batch``). Metrics and
logs come from process 0 (``is_main_process``); Orbax checkpoints are written by all hosts together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from clsvd_jax._src import tree_paths

log = logging.getLogger(__name__)

ENV_FLAG = "CLSVD_DISTRIBUTED"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_INIT_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids", "initialization_timeout")


def _multi(env: Mapping[str, str], key: str) -> bool:
  try:
    return int(env.get(key, "1")) > 1
  except ValueError:
    return False


def distributed_config(config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
                       ) -> dict[str, Any] | None:
  """Decides whether (and how) to call ``jax.distributed.initialize``; None means single process.

  Sources, first match wins:
    * ``config`` (the run config's ``distributed:`` section): ``enabled`` (true / false / "auto"), and optionally
      ``coordinator_address``, ``num_processes``, ``process_id``, ``local_device_ids``,
      ``initialization_timeout``.
    * ``CLSVD_DISTRIBUTED=0`` disables, ``=1`` enables with JAX's cluster auto-detection (TPU pods, SLURM, Open
      MPI, Kubernetes).
    * ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``): an explicit cluster, e.g. GPU
      hosts or processes on localhost.
    * auto-detection: a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` lists several hosts), a SLURM job with
      several tasks, an Open MPI job with several ranks.

  Returns:
    The keyword arguments for ``jax.distributed.initialize`` (empty = auto-detect), or None.
  """
  env = os.environ if env is None else env
  cfg = dict(config or {})
  enabled = cfg.pop("enabled", "auto")
  unknown = sorted(set(cfg) - set(_INIT_KEYS))
  if unknown:
    raise ValueError(f"distributed config: unknown field(s) {unknown}; known: enabled, {', '.join(_INIT_KEYS)}")
  if enabled is False or (isinstance(enabled, str) and enabled.lower() in _FALSE):
    return None
  explicit = {k: v for k, v in cfg.items() if v is not None}
  if explicit or enabled is True or (isinstance(enabled, str) and enabled.lower() in _TRUE):
    return explicit
  flag = env.get(ENV_FLAG, "").strip().lower()
  if flag in _FALSE:
    return None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    out: dict[str, Any] = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if env.get(name):
        try:
          out[key] = int(env[name])
        except ValueError:
          raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None
    return out
  if flag in _TRUE:
    return {}
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or _multi(env, "SLURM_NTASKS") or _multi(env, "OMPI_COMM_WORLD_SIZE"):
    return {}
  return None


def initialize_from_env(config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when ``distributed_config`` says so (idempotent).

  Returns:
    True when JAX runs as one process of several (initialized now or before).
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_config(config, env)
  if kwargs is None:
    return False
  log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "auto-detect")
  jax.distributed.initialize(**kwargs)
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main_process() -> bool:
  """True on process 0, the one that logs, writes metrics and plots."""
  return jax.process_index() == 0


def host_slice(num_examples: int, index: int | None = None, count: int | None = None) -> slice:
  """An even, contiguous share of ``num_examples`` for one host (e.g. of an evaluation set); the last hosts get one
  example fewer when it does not divide."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process index {index} outside [0, {count})")
  base, extra = divmod(num_examples, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (1 if index < extra else 0))


def host_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
  """The rows (leading dim) of a global batch array that this process's devices hold under ``sharding``.

  A host reads exactly these examples of each global batch. Raises when they are not contiguous (a mesh whose
  batch axes interleave hosts); order the mesh's devices by process or change the batch axes.
  """
  rows = set()
  for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
    if device.process_index == jax.process_index():
      sl = index[0] if index else slice(None)
      start, stop, _ = sl.indices(global_shape[0])
      rows.update(range(start, stop))
  if not rows:
    return slice(0, 0)
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"this process's rows of the batch are not contiguous under {sharding.spec}: the mesh "
                     "interleaves hosts on the batch axes; build it with clsvd_jax.parallel.make_mesh")
  return slice(lo, hi)


def make_global_array(local_rows: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
  """A global array from this host's rows (``host_rows``) of it; every host calls this with its own rows."""
  if jax.process_count() == 1:
    return jax.device_put(local_rows, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows), tuple(global_shape))


def host_local_batch(global_batch: Any, shardings: Any) -> Any:
  """Places a batch that every host holds whole: each host contributes only its own rows.

  Use it when data loading is cheap to repeat; otherwise read only ``host_rows`` per host and call
  ``make_global_array``.
  """
  sh_flat = shardings
  if not isinstance(shardings, NamedSharding):
    sh_flat = tree_paths.flatten_with_paths(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))

  def one(path: str, x: Any) -> jax.Array:
    sh = sh_flat if isinstance(sh_flat, NamedSharding) else sh_flat[path]
    x = np.asarray(x)
    return make_global_array(x[host_rows(sh, x.shape)], sh, x.shape)

  return tree_paths.map_with_paths(one, global_batch)


def sync(name: str) -> None:
  """A barrier: returns once every process got here (a no-op with one process).

  Put it where one process reads what another writes (a checkpoint's ``meta.json``, a pruned folder).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
  """Process 0's ``value`` on every process (e.g. which checkpoint to resume, so all hosts pick the same one)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def to_host(tree: Any) -> Any:
  """NumPy copies of the arrays of ``tree``; arrays spread over several processes are gathered first.

  Collective when any array spans processes without being replicated: every process must call it with arrays of
  the same layout (they do when they run the same program).
  """

  def one(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


# ------------------------------------------------------------------------------- several processes on one machine


def free_local_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a local coordinator)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def local_process_env(process_id: int, num_processes: int, port: int, *, devices_per_process: int,
                      base: Mapping[str, str] | None = None, xla_flags: str = "") -> dict[str, str]:
  """The environment of process ``process_id`` of a CPU cluster on localhost, for ``initialize_from_env``.

  Lets one machine rehearse a multi-host job: each process gets ``devices_per_process`` CPU devices, and
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` point them at one coordinator.
  """
  env = dict(os.environ if base is None else base)
  env.pop(ENV_FLAG, None)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} {xla_flags}".strip(),
             JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  return env


def wait_all(procs: Any, timeout: float) -> list[tuple[str, str]]:
  """``communicate()`` with every process (text mode); kills those still running when one fails or time is up."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs
