"""Optax transformations that keep every update in the orthogonal complement of the protected subspaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from optax.transforms import _masking

from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax._src import tree_paths
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


def _is_node(x: Any) -> bool:
  return x is None or isinstance(x, Subspace | _masking.MaskedNode)


def _check_sides(sides: str) -> None:
  if sides not in subspace_lib.SIDES:
    raise ValueError(f"unknown sides={sides!r}; expected one of {subspace_lib.SIDES}")


def init_subspaces(params: Any, *, mask: MaskOrFn = None, capacity: tuple[int, int] | int | None = None,
                   max_rank_ratio: float = 1.0, dtype: Any = np.float32) -> Any:
  """Rank-0 subspaces with fixed capacity for the selected matrices of ``params`` (None elsewhere).

  Args:
    params: pytree of parameters (``optax.partition``'s masked nodes are kept as they are).
    mask: None (every leaf with ndim >= 2), a pytree of bools shaped like params, or a callable params -> such a
      pytree.
    capacity: stored columns per side; see ``compute_subspaces``.
    max_rank_ratio: largest rank the default capacity must hold, as a fraction of min(m, n).
    dtype: dtype of the bases.
  """
  if callable(mask):
    mask = mask(params)

  def one(path: str, p: Any, selected: Any = None) -> Subspace | None:
    if isinstance(p, _masking.MaskedNode):
      return p
    if mask is None:
      selected = np.ndim(p) >= 2
    if not selected:
      return None
    if np.ndim(p) < 2:
      raise ValueError(f"parameter {path!r} has shape {np.shape(p)}: only matrices can be constrained; remove it "
                       "from the constrain mask / policy")
    return subspace_lib.empty_subspace(tuple(np.shape(p)), capacity=capacity, max_rank_ratio=max_rank_ratio,
                                       dtype=dtype)

  is_leaf = lambda x: isinstance(x, _masking.MaskedNode)
  if mask is None:
    return tree_paths.map_with_paths(one, params, is_leaf=is_leaf)
  return tree_paths.map_with_paths(one, params, mask, is_leaf=is_leaf)


def check_subspaces(params: Any, subspaces: Any) -> None:
  """Raises a ValueError naming the parameter when ``subspaces`` does not fit ``params``."""
  p_flat = tree_paths.flatten_with_paths(params, is_leaf=lambda x: isinstance(x, _masking.MaskedNode))
  s_flat = tree_paths.flatten_with_paths(subspaces, is_leaf=_is_node)
  missing = sorted(set(s_flat) - set(p_flat))
  if missing:
    raise ValueError(f"subspaces name parameters that params lack: {missing[:5]}")
  for path, s in s_flat.items():
    if isinstance(s, Subspace):
      shape = tuple(np.shape(p_flat[path]))
      want = tuple(s.rank.shape) + s.matrix_shape
      if shape != want:
        raise ValueError(f"subspace of {path!r} is for shape {want}, but the parameter has shape {shape}")


def project_updates(updates: Any, subspaces: Any, sides: str = "both") -> Any:
  """Applies ``subspace.project`` to every update that has a subspace; other leaves pass through untouched."""

  def one(u: Any, s: Any) -> Any:
    if isinstance(s, Subspace) and u is not None:
      return subspace_lib.project(u, s, sides)
    return u

  return jax.tree.map(one, updates, subspaces, is_leaf=lambda x: x is None)


def orthogonal_projection(*, sides: str = "both", subspaces: Any = None, mask: MaskOrFn = None,
                          capacity: tuple[int, int] | int | None = None,
                          max_rank_ratio: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """Maps each update to its projection onto the complement of the protected subspaces.

  Chain it LAST (after the optimizer and weight decay) to make the final update satisfy the invariant exactly.
  For the usual case use ``constrained``, which also projects the incoming gradient.

  Args:
    sides: ``both`` (default), ``left``, ``right`` or ``block``; see ``clsvd_jax.project``.
    subspaces: an initial subspace tree; default rank-0 subspaces for the leaves selected by ``mask``.
    mask: which leaves get a subspace slot; see ``init_subspaces``.
    capacity: stored columns per side of the rank-0 subspaces.
    max_rank_ratio: largest rank the default capacity must hold, as a fraction of min(m, n).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is an ``OrthogonalProjectionState``.
  """
  _check_sides(sides)

  def init_fn(params: Any) -> OrthogonalProjectionState:
    if subspaces is not None:
      check_subspaces(params, subspaces)
      return OrthogonalProjectionState(subspaces)
    return OrthogonalProjectionState(
        init_subspaces(params, mask=mask, capacity=capacity, max_rank_ratio=max_rank_ratio))

  def update_fn(updates: Any, state: OrthogonalProjectionState, params: Any = None, **extra_args: Any):
    del params, extra_args
    return project_updates(updates, state.subspaces, sides), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_orthogonal_complement(inner: optax.GradientTransformation, *, sides: str = "both",
                                   project_gradients: bool = True, subspaces: Any = None, mask: MaskOrFn = None,
                                   capacity: tuple[int, int] | int | None = None, max_rank_ratio: float = 1.0
                                   ) -> optax.GradientTransformationExtraArgs:
  """Wraps any optax optimizer so that the parameters move only in the complement of the protected subspaces.

  The incoming gradient is projected (optional) so the optimizer's moments live in the complement; the inner
  optimizer runs; its FINAL update is projected again. The second projection is what makes
  ``U^T dW = 0, dW V = 0`` exact: element-wise scalings such as Adam's rotate a projected gradient back into the
  protected span, and decoupled weight decay would shrink protected directions.

  Args:
    inner: any optax transformation (e.g. ``optax.adamw(1e-4, weight_decay=0.01)``).
    sides: projection variant: ``both`` (default), ``left``, ``right``, ``block``.
    project_gradients: also project the incoming gradient before ``inner`` sees it.
    subspaces: an initial subspace tree; default rank-0 subspaces (then this equals ``inner`` exactly).
    mask: which leaves get a subspace slot; see ``init_subspaces``. Leaves without one pass through untouched.
    capacity: stored columns per side of the rank-0 subspaces.
    max_rank_ratio: largest rank the default capacity must hold, as a fraction of min(m, n); keep it at the rank
      policy's cap so the bases stay smaller than the weights.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a ``ConstrainedState``.
  """
  _check_sides(sides)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> ConstrainedState:
    if subspaces is not None:
      check_subspaces(params, subspaces)
      subs = subspaces
    else:
      subs = init_subspaces(params, mask=mask, capacity=capacity, max_rank_ratio=max_rank_ratio)
    return ConstrainedState(subs, inner.init(params))

  def update_fn(updates: Any, state: ConstrainedState, params: Any = None, **extra_args: Any):
    if project_gradients:
      updates = project_updates(updates, state.subspaces, sides)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    updates = project_updates(updates, state.subspaces, sides)
    return updates, ConstrainedState(state.subspaces, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


constrained = scale_by_orthogonal_complement


def _find_states(opt_state: Any) -> list[Any]:
  found = []

  def visit(x: Any) -> Any:
    if isinstance(x, _STATE_TYPES):
      found.append(x)
    return x

  jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, _STATE_TYPES))
  return found


def get_subspaces(opt_state: Any) -> Any:
  """The subspace tree held by the (single) projection state inside ``opt_state``.

  With several projection states (e.g. ``optax.partition`` with two constrained groups) the trees are merged:
  masked positions of one are filled from the other.
  """
  states = _find_states(opt_state)
  if not states:
    raise ValueError("opt_state holds no constrained()/orthogonal_projection() state: build the optimizer with "
                     "clsvd_jax.constrained(...)")
  merged = states[0].subspaces
  for st in states[1:]:
    merged = jax.tree.map(lambda a, b: b if isinstance(a, _masking.MaskedNode) or a is None else a,
                          merged, st.subspaces, is_leaf=_is_node)
  return merged


def set_subspaces(opt_state: Any, subspaces: Any) -> Any:
  """Returns ``opt_state`` with new subspaces swapped in, keeping every shape and dtype.

  Because shapes, dtypes and the tree structure stay the same, a jitted train step that takes ``opt_state`` as an
  argument does not recompile. ``subspaces`` is a full tree shaped like params (as from ``compute_subspaces``);
  positions that a state masks out (``optax.partition``) are skipped; None resets a slot to rank 0. The arrays go
  into the state as they are: with a train step that donates ``opt_state``, read them back with
  ``get_subspaces`` instead of keeping references.

  Raises:
    ValueError: naming the parameter, when the trees do not match or a basis has another shape or dtype (compute
      the new subspaces with ``previous=get_subspaces(opt_state)`` to keep the capacity).
  """
  new_flat = tree_paths.flatten_with_paths(subspaces, is_leaf=_is_node)
  states = _find_states(opt_state)
  if not states:
    raise ValueError("opt_state holds no constrained()/orthogonal_projection() state: build the optimizer with "
                     "clsvd_jax.constrained(...)")
  slots: set[str] = set()

  def replace(path: str, old: Any) -> Any:
    if isinstance(old, _masking.MaskedNode):
      return old
    new = new_flat.get(path, None)
    if old is None:
      if isinstance(new, Subspace):
        raise ValueError(f"parameter {path!r} has no subspace slot in the optimizer state; include it in the "
                         "`mask` of clsvd_jax.constrained() so the slot exists from the start")
      return None
    slots.add(path)
    if new is None:
      return jax.tree.map(lambda x: jax.numpy.zeros_like(x), old)
    for field in Subspace._fields:
      a, b = getattr(old, field), getattr(new, field)
      if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        raise ValueError(f"subspace of {path!r}: field {field!r} has shape {tuple(b.shape)} {b.dtype}, the optimizer "
                         f"state holds {tuple(a.shape)} {a.dtype}; compute it with "
                         "compute_subspaces(..., previous=get_subspaces(opt_state)) to keep the capacity")
    return new

  def swap(x: Any) -> Any:
    if isinstance(x, _STATE_TYPES):
      subs = tree_paths.map_with_paths(replace, x.subspaces, is_leaf=_is_node)
      return x._replace(subspaces=subs)
    return x

  out = jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, _STATE_TYPES))
  extra = sorted(p for p, s in new_flat.items() if isinstance(s, Subspace) and p not in slots)
  if extra:
    raise ValueError(f"subspaces for parameters the optimizer state does not constrain: {extra[:5]}")
  return out
