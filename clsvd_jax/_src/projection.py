"""Optax transformations that keep every update in the orthogonal complement of the protected subspaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from clsvd_jax._src import matrix_axes, tree_paths
from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax._src.subspace import Subspace

MaskOrFn = Any | Callable[[Any], Any] | None


class OrthogonalProjectionState(NamedTuple):
  """State of ``orthogonal_projection``: the subspace tree (Subspace at constrained leaves, None elsewhere)."""

  subspaces: Any


class ConstrainedState(NamedTuple):
  """State of ``constrained``: the subspace tree and the wrapped optimizer's state."""

  subspaces: Any
  inner_state: optax.OptState


_STATE_TYPES = (OrthogonalProjectionState, ConstrainedState)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_param_leaf(x: Any) -> bool:
  return x is None or _is_masked(x) or tree_paths.is_variable(x)


def _check_sides(sides: str) -> None:
  if sides not in subspace_lib.SIDES:
    raise ValueError(f"unknown sides={sides!r}; expected one of {subspace_lib.SIDES}")


def _mask_by_path(params: Any, mask: MaskOrFn) -> dict[str, Any] | None:
  if mask is None:
    return None
  if callable(mask):
    mask = mask(params)
  by_path = {p: tree_paths.unwrap(v) for p, v in tree_paths.flatten_with_paths(mask, is_leaf=_is_param_leaf).items()}
  missing = sorted(set(tree_paths.flatten_with_paths(params, is_leaf=_is_masked)) - set(by_path))
  if missing:
    raise ValueError(f"the constrain mask has no entry for parameters {missing[:5]}; give a tree of bools shaped "
                     "like params (or a callable params -> such a tree)")
  return by_path


def init_subspaces(params: Any, *, mask: MaskOrFn = None, capacity: tuple[int, int] | int | None = None,
                   max_rank_ratio: float = 1.0, dtype: Any = np.float32, axes: matrix_axes.AxesSpec = None) -> Any:
  """Rank-0 subspaces with fixed capacity for the selected matrices of ``params`` (None elsewhere).

  Args:
    params: pytree of parameters (``optax.partition``'s masked nodes are kept as they are; nnx Variables are
      unwrapped, so the bases never inherit a weight's sharding metadata).
    mask: None (every leaf with ndim >= 2), a pytree of bools shaped like params, or a callable params -> such a
      pytree.
    capacity: stored columns per side; see ``compute_subspaces``.
    max_rank_ratio: largest rank the default capacity must hold, as a fraction of min(m, n).
    dtype: dtype of the bases.
    axes: input / output axes of each parameter; see ``clsvd_jax.MatrixAxes``.
  """
  selected_by_path = _mask_by_path(params, mask)
  matrix_axes.check_axes_paths(axes, tree_paths.flatten_with_paths(params, is_leaf=_is_masked))

  def one(path: str, p: Any) -> Subspace | None:
    p = tree_paths.unwrap(p)
    if p is None or _is_masked(p):
      return p
    selected = np.ndim(p) >= 2 if selected_by_path is None else selected_by_path[path]
    if not selected:
      return None
    lay = matrix_axes.resolve(path, tuple(np.shape(p)), axes)
    return subspace_lib.empty_subspace(lay.view_shape, capacity=capacity, max_rank_ratio=max_rank_ratio,
                                       dtype=dtype)

  return tree_paths.map_with_paths(one, params, is_leaf=_is_param_leaf)


def matrix_shapes(params: Any, *, mask: MaskOrFn = None, axes: matrix_axes.AxesSpec = None
                  ) -> dict[str, tuple[int, ...]]:
  """``{path: (*batch, m, n)}``: the ``[..., out, in]`` shape of every parameter ``init_subspaces`` selects.

  The shapes the rank policies take (``importance_ranks``, ``schedule_ranks``, ``energy_ranks``), for parameters
  in any layout (e.g. ``nnx.Einsum`` kernels with ``axes=clsvd_jax.nnx_matrix_axes(model)``).
  """
  subs = init_subspaces(params, mask=mask, axes=axes, capacity=0)
  return {path: tuple(s.rank.shape) + s.matrix_shape for path, s in subspace_lib.slots_by_path(subs).items()
          if isinstance(s, Subspace)}


def check_subspaces(params: Any, subspaces: Any, axes: matrix_axes.AxesSpec = None) -> None:
  """Raises a ValueError naming the parameter when ``subspaces`` does not fit ``params``."""
  p_flat = tree_paths.flatten_with_paths(params, is_leaf=_is_masked)
  s_flat = subspace_lib.slots_by_path(subspaces)
  extra = sorted(set(s_flat) - set(p_flat))
  if extra:
    raise ValueError(f"subspaces name parameters that params lack: {extra[:5]}")
  for path, s in s_flat.items():
    if isinstance(s, Subspace):
      lay = matrix_axes.resolve(path, tuple(np.shape(p_flat[path])), axes)
      want = tuple(s.rank.shape) + s.matrix_shape
      if lay.view_shape != want:
        raise ValueError(f"subspace of {path!r} is for shape {want}, but the parameter has shape "
                         f"{lay.view_shape} as a [..., out, in] matrix (stored {lay.shape})")
  missing = sorted(set(p_flat) - set(s_flat))
  if missing:
    raise ValueError(f"subspaces lack parameters {missing[:5]}: give a tree shaped like params with None where a "
                     "parameter is not constrained (compute_subspaces(params, ranks) returns one)")


def _state_subspaces(params: Any, subspaces: Any, axes: matrix_axes.AxesSpec) -> Any:
  """The given subspaces, checked and laid out in the structure of ``params`` (plain slots)."""
  check_subspaces(params, subspaces, axes)
  by_path = subspace_lib.slots_by_path(subspaces)
  return tree_paths.map_with_paths(lambda path, p: p if _is_masked(p) else by_path.get(path), params,
                                   is_leaf=_is_param_leaf)


def project_updates(updates: Any, subspaces: Any, sides: str = "both", axes: matrix_axes.AxesSpec = None,
                    precision: subspace_lib.PrecisionLike = None) -> Any:
  """Applies ``subspace.project`` to every update that has a subspace; other leaves pass through untouched.

  Updates and subspaces are matched by path, so either may be a plain pytree or an nnx container. ``precision``:
  see ``clsvd_jax.project``.
  """
  slots = subspace_lib.slots_by_path(subspaces)

  def one(path: str, u: Any) -> Any:
    s = slots.get(path)
    if not isinstance(s, Subspace) or u is None or _is_masked(u):
      return u
    lay = matrix_axes.resolve(path, tuple(np.shape(u)), axes)
    if lay.view_shape != tuple(s.rank.shape) + s.matrix_shape:
      raise ValueError(f"the update of {path!r} is a {lay.view_shape} [..., out, in] matrix (stored {lay.shape}) "
                       f"but its subspace is for {tuple(s.rank.shape) + s.matrix_shape}; give constrained() and "
                       "compute_subspaces() the same `axes`")
    return matrix_axes.from_matrix(subspace_lib.project(matrix_axes.to_matrix(u, lay), s, sides, precision), lay)

  return tree_paths.map_with_paths(one, updates, is_leaf=lambda x: x is None or _is_masked(x))


def orthogonal_projection(*, sides: str = "both", subspaces: Any = None, mask: MaskOrFn = None,
                          capacity: tuple[int, int] | int | None = None, max_rank_ratio: float = 1.0,
                          axes: matrix_axes.AxesSpec = None, precision: subspace_lib.PrecisionLike = None
                          ) -> optax.GradientTransformationExtraArgs:
  """Maps each update to its projection onto the complement of the protected subspaces.

  Chain it LAST (after the optimizer and weight decay) to make the final update satisfy the invariant exactly.
  For the usual case use ``constrained``, which also projects the incoming gradient.

  Args:
    sides: ``both`` (default), ``left``, ``right`` or ``block``; see ``clsvd_jax.project``.
    subspaces: an initial subspace tree; default rank-0 subspaces for the leaves selected by ``mask``.
    mask: which leaves get a subspace slot; see ``init_subspaces``.
    capacity: stored columns per side of the rank-0 subspaces.
    max_rank_ratio: largest rank the default capacity must hold, as a fraction of min(m, n).
    axes: input / output axes of each parameter; see ``clsvd_jax.MatrixAxes``.
    precision: the projection's matmul precision; default the backend's (``clsvd_jax.default_precision``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is an ``OrthogonalProjectionState``.
  """
  _check_sides(sides)
  precision = subspace_lib.check_precision(precision)

  def init_fn(params: Any) -> OrthogonalProjectionState:
    if subspaces is not None:
      return OrthogonalProjectionState(_state_subspaces(params, subspaces, axes))
    return OrthogonalProjectionState(
        init_subspaces(params, mask=mask, capacity=capacity, max_rank_ratio=max_rank_ratio, axes=axes))

  def update_fn(updates: Any, state: OrthogonalProjectionState, params: Any = None, **extra_args: Any):
    del params, extra_args
    return project_updates(updates, state.subspaces, sides, axes, precision), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def constrained(inner: optax.GradientTransformation, *, sides: str = "both", project_gradients: bool = True,
                subspaces: Any = None, mask: MaskOrFn = None, capacity: tuple[int, int] | int | None = None,
                max_rank_ratio: float = 1.0, axes: matrix_axes.AxesSpec = None,
                precision: subspace_lib.PrecisionLike = None) -> optax.GradientTransformationExtraArgs:
  """Wraps any optax optimizer so that the parameters move only in the complement of the protected subspaces.

  The incoming gradient is projected (optional) so the optimizer's moments live in the complement; the inner
  optimizer runs; its FINAL update is projected again. The second projection is what makes
  ``U^T dW = 0, dW V = 0`` exact: element-wise scalings such as Adam's rotate a projected gradient back into the
  protected span, and decoupled weight decay would shrink protected directions.

  Works in plain optax loops and inside ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` alike.

  Args:
    inner: any optax transformation (e.g. ``optax.adamw(1e-4, weight_decay=0.01)``).
    sides: projection variant: ``both`` (default), ``left`` (outputs), ``right`` (inputs), ``block``.
    project_gradients: also project the incoming gradient before ``inner`` sees it.
    subspaces: an initial subspace tree; default rank-0 subspaces (then this equals ``inner`` exactly).
    mask: which leaves get a subspace slot; see ``init_subspaces``. Leaves without one pass through untouched.
    capacity: stored columns per side of the rank-0 subspaces.
    max_rank_ratio: largest rank the default capacity must hold, as a fraction of min(m, n); keep it at the rank
      policy's cap so the bases stay smaller than the weights.
    axes: which axes of each parameter are its input and output (``clsvd_jax.MatrixAxes``): default ``[in, out]``
      for a 2-D Flax ``kernel`` and ``[..., out, in]`` for every other leaf. Give ``compute_subspaces`` the same.
    precision: the projections' matmul precision (``jax.lax.Precision`` or ``DotAlgorithmPreset``, or a name of
      one); default the backend's, chosen when the step is lowered: HIGHEST on CPU, TF32 x3 on Ampere+ GPUs, HIGH
      (bf16 x3) on TPU, each keeping the invariant below 1e-5 (``clsvd_jax.default_precision``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a ``ConstrainedState``.
  """
  _check_sides(sides)
  precision = subspace_lib.check_precision(precision)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> ConstrainedState:
    if subspaces is not None:
      subs = _state_subspaces(params, subspaces, axes)
    else:
      subs = init_subspaces(params, mask=mask, capacity=capacity, max_rank_ratio=max_rank_ratio, axes=axes)
    return ConstrainedState(subs, inner.init(params))

  def update_fn(updates: Any, state: ConstrainedState, params: Any = None, **extra_args: Any):
    if project_gradients:
      updates = project_updates(updates, state.subspaces, sides, axes, precision)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    updates = project_updates(updates, state.subspaces, sides, axes, precision)
    return updates, ConstrainedState(state.subspaces, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


scale_by_orthogonal_complement = constrained  # an alias in optax's scale_by_* naming; the docs use ``constrained``


def _find_states(opt_state: Any) -> list[Any]:
  found = []

  def visit(x: Any) -> Any:
    if isinstance(x, _STATE_TYPES):
      found.append(x)
    return x

  jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, _STATE_TYPES))
  if not found:
    raise ValueError("opt_state holds no constrained()/orthogonal_projection() state: build the optimizer with "
                     "clsvd_jax.constrained(...)")
  return found


def get_subspaces(opt_state: Any) -> Any:
  """The subspace tree held by the projection state inside ``opt_state``, as plain ``Subspace`` / None slots.

  ``opt_state`` may be an optax state or an ``nnx.Optimizer``'s ``opt_state``. With several projection states
  (e.g. ``optax.partition`` with two constrained groups) the trees are merged: masked positions of one are filled
  from the other.
  """
  states = _find_states(opt_state)
  merged = subspace_lib.slots_by_path(states[0].subspaces)
  for st in states[1:]:
    for path, slot in subspace_lib.slots_by_path(st.subspaces).items():
      if merged.get(path) is None or _is_masked(merged.get(path)):
        merged[path] = slot
  return tree_paths.map_with_paths(lambda path, _: merged[path], states[0].subspaces, is_leaf=subspace_lib.is_slot)


def set_subspaces(opt_state: Any, subspaces: Any) -> Any:
  """Returns ``opt_state`` with new subspaces swapped in, keeping every shape, dtype and container.

  Because shapes, dtypes and the tree structure stay the same, a jitted train step that takes ``opt_state`` as an
  argument does not recompile; with ``nnx.Optimizer`` assign the result back: ``opt.opt_state =
  set_subspaces(opt.opt_state, subs)``. ``subspaces`` is a full tree shaped like params (as from
  ``compute_subspaces``); positions that a state masks out (``optax.partition``) are skipped; None resets a slot to
  rank 0, and a constrained parameter the tree leaves out is an error (pass the tree computed with
  ``previous=get_subspaces(opt_state)``, which keeps every subspace it does not grow). The arrays go into the state
  as they are: with a train step that donates ``opt_state``, read them back with ``get_subspaces`` instead of
  keeping references.

  Raises:
    ValueError: naming the parameter, when the trees do not match or a basis has another shape or dtype (compute
      the new subspaces with ``previous=get_subspaces(opt_state)`` to keep the capacity).
  """
  new_flat = subspace_lib.slots_by_path(subspaces)
  _find_states(opt_state)  # raises when there is none
  slots: set[str] = set()
  omitted: list[str] = []

  def replace(path: str, stored: Any) -> Any:
    old = subspace_lib.as_slot(stored)
    if _is_masked(old):
      return stored
    new = new_flat.get(path, None)
    if old is None:
      if isinstance(new, Subspace):
        raise ValueError(f"parameter {path!r} has no subspace slot in the optimizer state; include it in the "
                         "`mask` of clsvd_jax.constrained() so the slot exists from the start")
      return stored
    slots.add(path)
    if path not in new_flat:
      omitted.append(path)
      return stored
    if new is None:
      return subspace_lib.refill_slot(stored, jax.tree.map(jax.numpy.zeros_like, old))
    if (old.batch_shape, old.matrix_shape) != (new.batch_shape, new.matrix_shape):
      raise ValueError(f"subspace of {path!r} is for a {new.batch_shape + new.matrix_shape} [..., out, in] matrix, "
                       f"the optimizer state's slot for {old.batch_shape + old.matrix_shape}; give "
                       "constrained() and compute_subspaces() the same `axes`")
    for field in Subspace._fields:
      a, b = getattr(old, field), getattr(new, field)
      if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        raise ValueError(f"subspace of {path!r}: field {field!r} has shape {tuple(b.shape)} {b.dtype}, the optimizer "
                         f"state holds {tuple(a.shape)} {a.dtype}; compute it with "
                         "compute_subspaces(..., previous=get_subspaces(opt_state)) to keep the capacity")
    return subspace_lib.refill_slot(stored, new)

  def swap(x: Any) -> Any:
    if isinstance(x, _STATE_TYPES):
      return x._replace(subspaces=tree_paths.map_with_paths(replace, x.subspaces, is_leaf=subspace_lib.is_slot))
    return x

  out = jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, _STATE_TYPES))
  if omitted:
    raise ValueError(f"subspaces omit constrained parameters {omitted[:5]}: pass a full tree, e.g. "
                     "compute_subspaces(params, ranks, previous=get_subspaces(opt_state)) (it keeps every subspace "
                     "that gets no new rank); None at a path resets it to rank 0")
  extra = sorted(p for p, s in new_flat.items() if isinstance(s, Subspace) and p not in slots)
  if extra:
    raise ValueError(f"subspaces for parameters the optimizer state does not constrain: {extra[:5]}")
  return out
