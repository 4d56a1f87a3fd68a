"""Device meshes with the three axes every sharding rule of the project names: data, fsdp, tensor (docs/design.md §10).

``data`` is pure data parallelism (parameters replicated along it), ``fsdp`` shards parameters, moments and bases
(and the batch), ``tensor`` splits matrices along their heads / hidden units (Megatron-style column and row
parallelism). A config says ``mesh: {data: 1, fsdp: -1, tensor: 1}``; -1 takes the devices the others leave.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from clsvd_jax._src.partition_rules import AXES


def resolve_mesh_shape(spec: Mapping[str, int] | Sequence[int] | None, num_devices: int) -> tuple[int, int, int]:
  """Turns a mesh config into concrete axis sizes ``(data, fsdp, tensor)``.

  Args:
    spec: ``{"data": N, "fsdp": N, "tensor": N}`` (missing axes are 1), a 3-sequence in ``AXES`` order, or None
      (every device on ``fsdp``). At most one size may be -1: it takes ``num_devices // (product of the others)``.
    num_devices: how many devices the mesh must cover.

  Raises:
    ValueError: naming the field, for unknown axes, sizes that are not positive integers or -1, two -1 entries, or
      sizes whose product is not the device count.
  """
  if spec is None:
    spec = {"fsdp": -1}
  if isinstance(spec, Mapping):
    unknown = sorted(set(spec) - set(AXES))
    if unknown:
      raise ValueError(f"mesh config: unknown axis {unknown}; the axes are {AXES} (e.g. mesh: {{data: 1, fsdp: -1, "
                       "tensor: 1}})")
    sizes = [spec.get(a, 1) for a in AXES]
  else:
    sizes = list(spec)
    if len(sizes) != len(AXES):
      raise ValueError(f"mesh config: expected {len(AXES)} sizes for axes {AXES}, got {sizes}")
  for axis, s in zip(AXES, sizes):
    if isinstance(s, bool) or not isinstance(s, int | np.integer) or (s < 1 and s != -1):
      raise ValueError(f"mesh config: mesh.{axis} must be a positive integer or -1 (the rest of the devices), "
                       f"got {s!r}")
  sizes = [int(s) for s in sizes]
  free = [a for a, s in zip(AXES, sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh config: only one axis may be -1, got -1 for {free}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh config: the fixed axes {dict(zip(AXES, sizes))} use {fixed} devices, which does not "
                       f"divide the {num_devices} devices available, so mesh.{free[0]}=-1 has no integer size")
    sizes[AXES.index(free[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh config: {dict(zip(AXES, sizes))} needs {fixed} devices but {num_devices} are available; "
                     "set one axis to -1 to take the rest")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(spec: Mapping[str, int] | Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "tensor")``.

  Args:
    spec: axis sizes, see ``resolve_mesh_shape`` (-1 = the rest of the devices).
    devices: the devices to use (default ``jax.devices()``: every device of every process).

  Returns:
    A mesh whose device order follows the physical topology where JAX knows it (TPU slices), so the ``tensor``
    axis, the innermost, maps to the nearest chips.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(spec, len(devices))
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError, TypeError):
    # Sub-sets of devices and CPU hosts have no topology to follow: keep the given order.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  """``{axis: size}`` of a mesh."""
  return {name: int(size) for name, size in mesh.shape.items()}
