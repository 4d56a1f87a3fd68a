"""Subspaces at task boundaries, computed where the weights live (docs/design.md §10).

``compute_subspaces`` does one batched SVD per stacked weight ``[L, m, n]``. On a mesh this module runs that same
computation (``clsvd_jax._src.subspace.accumulate``, so the numbers are the single-device ones) with the layer
axis split over EVERY device of the mesh: each device decomposes ``L / num_devices`` whole matrices (the stack is
zero-padded to a multiple of the device count; a zero matrix with rank 0 yields an empty subspace and is dropped
again). No device ever holds more than its layers' matrices and their factors. The results come out of the same
compiled program already resharded to the bases' specs (a basis follows its weight, ``opt_state.subspace_specs``),
ready for ``clsvd_jax.set_subspaces``. The program's memory analysis gives the boundary's peak bytes per device.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax._src import tree_paths
from clsvd_jax._src.subspace import Subspace
from clsvd_jax.parallel import opt_state as opt_state_lib
from clsvd_jax.parallel import rules as rules_lib

# Compiled boundary programs by (mesh, dtype, input layout, capacities, specs); oldest evicted first.
_COMPILED: dict[Any, Any] = {}
_CACHE_SIZE = 8


def memory_stats(compiled: Any) -> dict[str, int] | None:
  """Bytes per device of a compiled program (``jax.jit(f).lower(...).compile()``), or None where the backend has
  no memory analysis. ``peak`` is the backend's peak where it reports one, else arguments + outputs + temporaries
  - aliased bytes (an upper bound of what the program needs at once)."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    return None
  if stats is None:
    return None
  if isinstance(stats, list | tuple):
    stats = stats[0]
  out = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "temp", "alias", "generated_code")}
  peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  out["peak"] = peak if peak > 0 else out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _check_rank(path: str, shape: tuple[int, ...], k: Any, prev: Subspace | None, cap: tuple[int, int]) -> np.ndarray:
  *batch, m, n = shape
  try:
    k_arr = np.broadcast_to(np.asarray(k), tuple(batch))
  except ValueError:
    k_arr = None
  if k_arr is None or not np.issubdtype(np.asarray(k).dtype, np.integer):
    raise ValueError(f"rank for {path!r} must be an integer or an integer array of shape {tuple(batch)}; got "
                     f"{np.asarray(k)!r}")
  if (k_arr < 0).any() or (k_arr > min(m, n)).any():
    raise ValueError(f"rank for {path!r} must lie in [0, {min(m, n)}] for shape {shape}; got {k_arr.tolist()}")
  if prev is not None:
    if tuple(prev.rank.shape) + prev.matrix_shape != shape:
      raise ValueError(f"previous subspace of {path!r} is for shape {prev.rank.shape + prev.matrix_shape}, but the "
                       f"parameter has shape {shape}")
    prev_k = np.asarray(jax.device_get(prev.rank))
    if (k_arr < prev_k).any():
      raise ValueError(f"ranks for {path!r} shrink from {prev_k.tolist()} to {k_arr.tolist()}: protected subspaces "
                       "only grow between tasks")
  for side, dim, c in (("left", m, cap[0]), ("right", n, cap[1])):
    if not subspace_lib.representable(k_arr, dim, c).all():
      raise ValueError(f"rank {k_arr.tolist()} of {path!r} does not fit the {side} capacity {c} (dimension {dim}); "
                       f"use capacity >= {dim // 2}")
  return np.ascontiguousarray(k_arr, dtype=np.int32)


def _mesh_axes(entry: Any, mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes of one spec entry, without size-1 axes (they move nothing)."""
  axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
  return tuple(a for a in axes if mesh.shape[a] > 1)


def _spec_entry(axes: tuple[str, ...]) -> Any:
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _layer_sharded(w: jax.Array, k: jax.Array, prev: Subspace, cov: jax.Array | None, *, mesh: Mesh,
                   weight_spec: PartitionSpec, capacity: tuple[int, int], dtype: Any) -> tuple[Subspace, jax.Array]:
  """``accumulate`` with the flattened layer axis split over all mesh devices.

  The weight arrives as ``[N, m, n]`` split on m over the axes ``sm`` and on n over ``sn`` (its own layout). Two
  all-to-alls trade those splits for a split of the layer axis (each device then owns whole matrices), the axes
  that replicate the weight (``rest``, e.g. data) split the layers further by plain slicing, and the results go
  back the same way into the bases' layouts (a basis's capacity column split like the weight's other dim). Every
  step moves only shards: no device ever gathers a whole stack (XLA's automatic resharding between these layouts
  replicates the tensor first).
  """
  batch = w.shape[:-2]
  n_mat = int(np.prod(batch)) if batch else 1
  pad = (-n_mat) % mesh.size
  entries = tuple(weight_spec) + (None,) * (w.ndim - len(tuple(weight_spec)))
  sm, sn = _mesh_axes(entries[-2], mesh), _mesh_axes(entries[-1], mesh)
  rest = tuple(a for a in mesh.axis_names if a not in sm + sn and mesh.shape[a] > 1)
  order = sm + sn + rest

  def flat(x: jax.Array, tail: int) -> jax.Array:
    x = x.reshape((n_mat,) + x.shape[x.ndim - tail:])
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * tail)

  size = lambda axes: int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

  # The capacity column of a basis is split over the weight's other matrix dim's axes when they divide it.
  cl = sn if capacity[0] % size(sn) == 0 else ()
  cr = sm if capacity[1] % size(sm) == 0 else ()

  def take(x: jax.Array, axes: tuple[str, ...], axis: int = 0) -> jax.Array:
    """This device's chunk of dim ``axis`` (the chunk index runs over ``axes``, the first one major)."""
    if not axes:
      return x
    index = 0
    for a in axes:
      index = index * mesh.shape[a] + jax.lax.axis_index(a)
    n = x.shape[axis] // size(axes)
    return jax.lax.dynamic_slice_in_dim(x, index * n, n, axis=axis)

  def a2a(x: jax.Array, axes: tuple[str, ...], split: int, concat: int) -> jax.Array:
    return jax.lax.all_to_all(x, axes, split, concat, tiled=True) if axes else x

  def gather(x: jax.Array, axes: tuple[str, ...], axis: int = 0) -> jax.Array:
    # Minor axis first, so the chunks come back in order.
    for a in reversed(axes):
      x = jax.lax.all_gather(x, a, axis=axis, tiled=True)
    return x

  def local(w_, k_, left, right, left_allow, right_allow, rank, *cov_):
    w_ = take(a2a(a2a(w_, sm, 0, 1), sn, 0, 2), rest)
    left, right = gather(left, cl, axis=2), gather(right, cr, axis=2)
    prev_ = Subspace(take(a2a(left, sm, 0, 1), sn + rest), take(a2a(take(right, sm), sn, 0, 1), rest),
                     take(left_allow, order), take(right_allow, order), take(rank, order))
    sub, spectrum = subspace_lib.accumulate(w_, take(k_, order), prev_, capacity, dtype, cov_[0] if cov_ else None)
    out = Subspace(left=take(a2a(gather(gather(sub.left, rest), sn), sm, 1, 0), cl, axis=2),
                   right=take(gather(a2a(gather(sub.right, rest), sn, 1, 0), sm), cr, axis=2),
                   left_allow=gather(sub.left_allow, order), right_allow=gather(sub.right_allow, order),
                   rank=gather(sub.rank, order))
    return out, gather(spectrum, order)

  e_m, e_n = _spec_entry(sm), _spec_entry(sn)
  left_spec = PartitionSpec(None, e_m, _spec_entry(cl))
  right_spec = PartitionSpec(None, e_n, _spec_entry(cr))
  in_specs = [PartitionSpec(None, e_m, e_n), PartitionSpec(), left_spec, right_spec, PartitionSpec(),
              PartitionSpec(), PartitionSpec()]
  args = [flat(w, 2), flat(k, 0), flat(prev.left, 2), flat(prev.right, 2), flat(prev.left_allow, 0),
          flat(prev.right_allow, 0), flat(prev.rank, 0)]
  if cov is not None:
    in_specs.append(PartitionSpec(_spec_entry(order)))
    args.append(flat(cov, 2))
  out_specs = (Subspace(left_spec, right_spec, PartitionSpec(), PartitionSpec(), PartitionSpec()), PartitionSpec())
  sub, spectrum = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                                check_vma=False)(*args)
  unflat = lambda x: x[:n_mat].reshape(batch + x.shape[1:])
  return jax.tree.map(unflat, sub), unflat(spectrum)


def compute_subspaces_sharded(params: Any, ranks: Any, previous: Any = None, *, mesh: Mesh,
                              param_shardings: Any = None, capacity: tuple[int, int] | int | None = None,
                              max_rank_ratio: float = 1.0, dtype: Any = jnp.float32,
                              covariances: Mapping[str, Any] | None = None, return_singular_values: bool = False,
                              return_memory: bool = False) -> Any:
  """``clsvd_jax.compute_subspaces`` on a mesh: decomposed layer-sharded, returned in the bases' shardings.

  Args:
    params: the parameters, ideally already laid out on ``mesh``.
    ranks: protected counts, as for ``compute_subspaces`` (pytree like params or ``{path: rank}``).
    previous: the previous subspace tree (``clsvd_jax.get_subspaces(opt_state)``) or None.
    mesh: the device mesh.
    param_shardings: NamedShardings shaped like params; default each weight's own NamedSharding, else the
      default partition rules.
    capacity, max_rank_ratio, dtype, covariances: as for ``compute_subspaces``.
    return_singular_values: also return ``{path: spectrum}`` (replicated).
    return_memory: also return the boundary program's bytes per device (``memory_stats``; None where the backend
      has no memory analysis).

  Returns:
    The subspace tree (like ``compute_subspaces``), followed by the spectra and / or the memory dict when asked.
  """
  by_path = subspace_lib.ranks_by_path(params, ranks)
  p_flat = tree_paths.flatten_with_paths(params)
  prev_flat = {}
  if previous is not None:
    prev_flat = tree_paths.flatten_with_paths(previous, is_leaf=lambda x: x is None or isinstance(x, Subspace))
  covariances = dict(covariances or {})
  unknown_cov = sorted(set(covariances) - {p for p, k in by_path.items() if k is not None})
  if unknown_cov:
    raise ValueError(f"covariances given for parameters without a rank: {unknown_cov[:5]}")
  if param_shardings is None:
    leaves = list(p_flat.values())
    if all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh for x in leaves):
      sh_flat = {p: x.sharding for p, x in p_flat.items()}
    else:
      sh_flat = tree_paths.flatten_with_paths(rules_lib.param_shardings(params, mesh),
                                              is_leaf=lambda x: isinstance(x, NamedSharding))
  else:
    sh_flat = tree_paths.flatten_with_paths(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))

  jobs: dict[str, tuple[tuple[int, int], Any, PartitionSpec]] = {}
  inputs: dict[str, tuple[Any, ...]] = {}
  for path, k in by_path.items():
    if k is None:
      continue
    w = p_flat[path]
    shape = tuple(np.shape(w))
    if len(shape) < 2:
      raise ValueError(f"parameter {path!r} has shape {shape}: only matrices ([..., m, n]) can be constrained")
    prev = prev_flat.get(path)
    if prev is not None:
      cap = prev.capacity
    else:
      cap = subspace_lib.resolve_capacity(capacity, shape[-2], shape[-1], max_rank_ratio)
    k_arr = _check_rank(path, shape, k, prev, cap)
    if prev is None:
      prev = subspace_lib.empty_subspace(shape, capacity=cap, dtype=jnp.float32)
    cov = covariances.get(path)
    if cov is not None and tuple(np.shape(cov)) != shape[:-2] + (shape[-1], shape[-1]):
      raise ValueError(f"input covariance of {path!r} has shape {tuple(np.shape(cov))}; expected "
                       f"{shape[:-2] + (shape[-1], shape[-1])}")
    spec = sh_flat[path].spec
    out_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), opt_state_lib.subspace_specs(spec, shape, cap, mesh),
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
    jobs[path] = (cap, out_sh, spec)
    inputs[path] = (w, k_arr, prev, cov)

  replicated = NamedSharding(mesh, PartitionSpec())
  out_shardings = {p: (sh, replicated) for p, (_, sh, _) in jobs.items()}
  caps = {p: cap for p, (cap, _, _) in jobs.items()}
  specs = {p: spec for p, (_, _, spec) in jobs.items()}

  # Tasks of one run share shapes and layouts: compile the boundary program once per layout, not per task.
  leaves, treedef = jax.tree.flatten(inputs)
  key = (mesh, str(jnp.dtype(dtype)), treedef,
         tuple((jnp.shape(x), str(jnp.result_type(x)), getattr(x, "sharding", None)) for x in leaves),
         tuple((p, caps[p], specs[p], out_shardings[p]) for p in sorted(jobs)))
  compiled = _COMPILED.get(key)
  if compiled is None:
    @functools.partial(jax.jit, out_shardings=out_shardings)
    def boundary(args: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Subspace, jax.Array]]:
      return {p: _layer_sharded(w, k, prev, cov, mesh=mesh, weight_spec=specs[p], capacity=caps[p],
                               dtype=dtype)
              for p, (w, k, prev, cov) in args.items()}

    compiled = boundary.lower(inputs).compile()
    if len(_COMPILED) >= _CACHE_SIZE:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled
  results = compiled(inputs)

  def place(path: str, _: Any) -> Any:
    if path in results:
      return results[path][0]
    return prev_flat.get(path)

  subs = tree_paths.map_with_paths(place, params)
  out: list[Any] = [subs]
  if return_singular_values:
    out.append({p: r[1] for p, r in results.items()})
  if return_memory:
    out.append(memory_stats(compiled))
  return out[0] if len(out) == 1 else tuple(out)
