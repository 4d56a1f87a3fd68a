"""Where a run's arrays live: one device, or a mesh over every device of every process.

``Layout`` places the parameters and optimizer state (on a mesh by ``clsvd_jax.parallel``'s partition rules, a basis
following its weight), turns the host's rows of a training batch into the device batch the step takes (explicit
transfers only), and says which rows of each batch this host reads (``host_split``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from clsvd_jax.config import ConfigError, MeshConfig
from clsvd_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Layout:
  """Placement of a run's arrays.

  Attributes:
    kind: the model kind (which batch keys the step takes).
    batch_size: the global batch size.
    mesh: the device mesh, or None for one device.
    param_shardings, opt_shardings: NamedShardings of params and optimizer state (None on one device).
    replicated: the sharding of small arrays every device holds (None on one device).
    batch_shardings: ``{key: NamedSharding}`` of a training batch (None on one device).
    host_split: ``(process_index, process_count)`` the training ``BatchIterator`` slices rows by. Where this host's
      devices do not hold one contiguous, even share of the rows in process order (e.g. a mesh that replicates the
      batch over hosts), the host reads whole batches (``(0, 1)``) and ``put_batch`` keeps the rows its devices
      hold.
    host_rows: the rows of a whole batch this host's devices hold (with ``host_split == (0, 1)`` on a mesh).
  """

  kind: str
  batch_size: int
  mesh: Any = None
  param_shardings: Any = None
  opt_shardings: Any = None
  replicated: Any = None
  batch_shardings: Mapping[str, Any] | None = None
  host_split: tuple[int, int] = (0, 1)
  host_rows: slice | None = None

  @property
  def step_shardings(self) -> tuple[Any, Any, Any] | None:
    """What ``step.TrainStep.shardings`` takes."""
    return None if self.mesh is None else (self.param_shardings, self.opt_shardings, self.replicated)

  def describe(self) -> str:
    """A stable description (part of the train step's cache key)."""
    if self.mesh is None:
      return f"device:{jax.devices()[0].id}"
    return f"mesh:{dict(self.mesh.shape)}:{[d.id for d in self.mesh.devices.flat]}"

  def place_state(self, params: Any, opt_state: Any) -> tuple[Any, Any]:
    """Params and optimizer state committed to their layout (no copy for arrays already there).

    Every argument of the train step is committed to where it runs, so a fresh run, a resumed one (restored
    arrays come back committed) and a task after a boundary (new subspaces) call one compiled program.
    """
    if self.mesh is None:
      return jax.device_put((params, opt_state), _one_device())
    return jax.device_put((params, opt_state), (self.param_shardings, self.opt_shardings))

  def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The device batch of the rows a ``BatchIterator`` gave this host (only the keys the step takes)."""
    keys = step_lib.TRAIN_KEYS[self.kind]
    if self.mesh is None:
      return jax.device_put({k: np.asarray(batch[k]) for k in keys}, _one_device())
    from clsvd_jax.parallel import distributed

    out = {}
    for k in keys:
      v = np.asarray(batch[k])
      rows = v if self.host_rows is None else v[self.host_rows]
      out[k] = distributed.make_global_array(rows, self.batch_shardings[k], (self.batch_size, *v.shape[1:]))
    return out

  def put_replicated(self, tree: Any) -> Any:
    """Small host values (the step carry, the RNG key) on every device."""
    return jax.device_put(tree, self.replicated if self.replicated is not None else _one_device())

  def put_opt_state(self, opt_state: Any) -> Any:
    """An optimizer state built on the host side of the layout (e.g. reset moments) in its place."""
    return jax.device_put(opt_state, self.opt_shardings) if self.opt_shardings is not None else opt_state


def _one_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def single_device(kind: str, batch_size: int) -> Layout:
  return Layout(kind=kind, batch_size=batch_size)


def on_mesh(m: MeshConfig, kind: str, batch_size: int, tx: optax.GradientTransformation, params: Any
            ) -> tuple[Layout, Any, Any]:
  """Lays params and optimizer state out on the mesh ``m``; batches are split over data x fsdp.

  Returns:
    ``(layout, params, opt_state)`` with params and optimizer state placed.

  Raises:
    ConfigError: naming ``mesh`` when it does not fit the devices.
  """
  from jax.sharding import NamedSharding, PartitionSpec

  from clsvd_jax import parallel
  from clsvd_jax.parallel import distributed

  try:
    mesh = parallel.make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor})
  except ValueError as e:
    raise ConfigError(str(e)) from None  # names mesh.<axis> and the device count
  params, opt_state, p_sh, o_sh = parallel.shard_training_state(params, tx, mesh)
  spec = parallel.batch_spec(2)
  keys = step_lib.TRAIN_KEYS[kind]
  b_sh = {k: NamedSharding(mesh, spec) for k in keys}
  index, count = jax.process_index(), jax.process_count()
  rows = distributed.host_rows(b_sh[keys[0]], (batch_size, 1))
  share = batch_size // count
  sliced = batch_size % count == 0 and rows == slice(index * share, (index + 1) * share)
  layout = Layout(kind=kind, batch_size=batch_size, mesh=mesh, param_shardings=p_sh, opt_shardings=o_sh,
                  replicated=NamedSharding(mesh, PartitionSpec()), batch_shardings=b_sh,
                  host_split=(index, count) if sliced else (0, 1), host_rows=None if sliced else rows)
  return layout, params, opt_state
