"""Shardings of an optimizer state: moments follow their parameters, each basis follows its weight (docs/design.md §10).

The state is matched to the parameters by path, not by tree structure, so any optax state works (chains,
``optax.partition``, ``MaskedNode`` gaps, ``clsvd_jax.constrained`` with its ``Subspace`` tree): a state leaf whose
path ends with a parameter's path and has that parameter's shape (Adam's mu and nu) takes the parameter's
sharding. A ``Subspace`` at a weight's path of shape ``[..., m, n]`` gets

* ``left``  ``[..., m, c]``: the weight's batch-dim specs, then its dim -2 spec, then (capacity) its dim -1 spec;
* ``right`` ``[..., n, c]``: the weight's batch-dim specs, then its dim -1 spec, then (capacity) its dim -2 spec;
* ``left_allow``, ``right_allow``, ``rank`` (one flag / int per matrix): replicated.

So the projection ``B B^T G`` inside the train step multiplies operands that already live on the same devices as
the update, and a layer's bases cost each device about what its shard of the weight costs (docs/design.md §5: at
most the weight's bytes with a rank cap, up to 1.25x for a 2:1 matrix without one). Bases are built here, outside
``nnx.Optimizer``'s metadata propagation (which would copy the weight's sharding onto a [m, c] basis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clsvd_jax._src import tree_paths
from clsvd_jax._src.subspace import Subspace
from clsvd_jax.parallel import rules as rules_lib

# State leaves smaller than this many elements and matched to no parameter (counts, flags) stay replicated.
SMALL = 2**16


def _is_leaf(x: Any) -> bool:
  return x is None or isinstance(x, Subspace)


def _padded(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
  entries = tuple(spec)
  return entries + (None,) * (ndim - len(entries))


def _axes_size(entry: Any, sizes: Mapping[str, int]) -> int:
  axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
  return int(np.prod([sizes[a] for a in axes])) if axes else 1


def subspace_specs(weight_spec: PartitionSpec, weight_shape: tuple[int, ...], capacity: tuple[int, int],
                   mesh: Mesh | Mapping[str, int]) -> Subspace:
  """The PartitionSpecs of a ``Subspace`` whose weight has ``weight_spec`` and ``weight_shape``.

  ``left [..., m, c]`` takes the weight's batch specs and dim -2 spec; ``right [..., n, c]`` its batch specs and
  dim -1 spec. The capacity column c of each side takes the spec of the weight's OTHER matrix dim (when it
  divides): with pure FSDP (``tensor`` = 1) the left basis would otherwise be whole on every device, and the bases
  of a layer can be as large as its weights. The projection gathers a basis's columns when it uses them, like
  FSDP gathers a weight. Flags and ranks (one per matrix) are replicated.
  """
  sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  entries = _padded(weight_spec, len(weight_shape))
  batch, sm, sn = entries[:-2], entries[-2], entries[-1]
  c_left = sn if capacity[0] % _axes_size(sn, sizes) == 0 else None
  c_right = sm if capacity[1] % _axes_size(sm, sizes) == 0 else None
  return Subspace(left=PartitionSpec(*batch, sm, c_left), right=PartitionSpec(*batch, sn, c_right),
                  left_allow=PartitionSpec(), right_allow=PartitionSpec(), rank=PartitionSpec())


def _match(path: str, table: Mapping[str, Any]) -> str | None:
  """Longest parameter path that ``path`` ends with (whole components only)."""
  parts = path.split("/")
  for i in range(len(parts)):
    cand = "/".join(parts[i:])
    if cand in table:
      return cand
  return None


def _mesh_of(shardings: Any) -> Mesh:
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError("param_shardings holds no NamedSharding; build it with clsvd_jax.parallel.param_shardings")


def opt_state_specs(opt_state: Any, params: Any, param_specs: Any, mesh: Mesh | Mapping[str, int]) -> Any:
  """A tree of PartitionSpecs shaped like ``opt_state`` (``Subspace`` nodes become Subspaces of specs).

  Args:
    opt_state: the optimizer state, concrete or abstract (``jax.eval_shape(tx.init, params)``).
    params: the parameters (arrays or ShapeDtypeStructs).
    param_specs: PartitionSpecs shaped like params.
    mesh: the mesh, or ``{axis: size}``, for state leaves no parameter explains (sharded over fsdp when large).

  Raises:
    ValueError: naming the path, when a subspace sits at a path with no parameter of its shape.
  """
  p_shapes = {k: tuple(np.shape(v)) for k, v in tree_paths.flatten_with_paths(params).items()}
  p_specs = tree_paths.flatten_with_paths(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def one(path: str, x: Any) -> Any:
    if x is None:
      return None
    if isinstance(x, Subspace):
      key = _match(path, p_shapes)
      shape = tuple(x.rank.shape) + tuple(x.matrix_shape)
      if key is None or p_shapes[key] != shape:
        raise ValueError(f"optimizer state holds a subspace at {path!r} for a matrix of shape {shape}, but no "
                         f"parameter of that shape has a path it ends with; pass the params the state was built for")
      return subspace_specs(p_specs[key], shape, x.capacity, mesh)
    shape = tuple(np.shape(x))
    key = _match(path, p_shapes)
    if key is not None and p_shapes[key] == shape:
      return p_specs[key]
    return rules_lib.spec_for(path, shape, mesh, rules=(), unmatched="fsdp", min_shard_size=SMALL)

  return tree_paths.map_with_paths(one, opt_state, is_leaf=_is_leaf)


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any) -> Any:
  """A tree of ``NamedSharding`` shaped like ``opt_state``; see ``opt_state_specs``.

  Args:
    opt_state: the optimizer state, concrete or abstract.
    params: the parameters (arrays or ShapeDtypeStructs).
    param_shardings: ``NamedSharding`` tree shaped like params (from ``param_shardings``).
  """
  mesh = _mesh_of(param_shardings)
  p_specs = jax.tree.map(lambda s: s.spec, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  specs = opt_state_specs(opt_state, params, p_specs, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_opt_state(tx: optax.GradientTransformation, params: Any, param_shardings: Any) -> tuple[Any, Any]:
  """Builds the optimizer state directly in its sharded layout (no full copy on any device).

  Returns:
    ``(opt_state, opt_state_shardings)``.
  """
  abstract = jax.eval_shape(tx.init, params)
  shardings = opt_state_shardings(abstract, params, param_shardings)
  state = jax.jit(tx.init, in_shardings=(param_shardings,), out_shardings=shardings)(params)
  return state, shardings


def basis_sharding_errors(opt_state: Any, params: Any) -> list[str]:
  """Checks that every basis in ``opt_state`` is laid out as its weight says (``.sharding.spec``).

  Returns:
    One message per mismatch (empty when all bases follow their weights).
  """
  p_flat = tree_paths.flatten_with_paths(params)
  errors = []

  def norm(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    return _padded(spec, ndim)

  def one(path: str, x: Any) -> Any:
    if not isinstance(x, Subspace):
      return x
    key = _match(path, p_flat)
    w = p_flat[key]
    want = subspace_specs(w.sharding.spec, tuple(w.shape), x.capacity, w.sharding.mesh)
    for field in ("left", "right"):
      arr = getattr(x, field)
      got_spec = norm(arr.sharding.spec, arr.ndim)
      if got_spec != norm(getattr(want, field), arr.ndim):
        errors.append(f"{path}/{field}: sharded {got_spec}, the weight {w.sharding.spec} asks "
                      f"{norm(getattr(want, field), arr.ndim)}")
    return x

  tree_paths.map_with_paths(one, opt_state, is_leaf=_is_leaf)
  return errors


def replicated_arrays(tree: Any, threshold: int, ignore: Any = ()) -> list[str]:
  """Paths of arrays with at least ``threshold`` elements that are fully replicated on a mesh of several devices.

  ``ignore``: parameter paths replicated on purpose; state leaves whose path ends with one of them are skipped.
  """
  ignore = tuple(ignore)
  out = []
  for path, x in tree_paths.flatten_with_paths(tree).items():
    if any(path == p or path.endswith("/" + p) for p in ignore):
      continue
    if isinstance(x, jax.Array) and x.size >= threshold and len(x.sharding.device_set) > 1:
      if x.sharding.is_fully_replicated:
        out.append(f"{path} {tuple(x.shape)}")
  return out
