"""Protected subspaces of weight matrices and the projection onto their orthogonal complement.

A matrix W (m x n), or a stack of them ([..., m, n]), has a protected left basis U (m x k) and right basis
V (n x k). The projection that keeps the protected part of W fixed is

    P(G) = (I - U U^T) G (I - V V^T).

Static shapes (docs/design.md §5): each side stores ONE basis B with a fixed number of columns (the capacity c), zero
padded, and a flag. With ``allow=False`` B holds the protected directions and the side applies ``G - B B^T G``;
with ``allow=True`` B holds the allowed directions (the complement) and the side applies ``B B^T G``. A side stores
whichever of the two is smaller, so a capacity of ``dim // 2`` represents every rank; the bases of one matrix then
cost exactly the matrix when it is square, and up to 1.25x a 2:1 one unless a rank cap bounds the capacity
(``default_capacity``, docs/design.md §5). Zero columns project nothing, hence ranks are data: changing them
between tasks keeps every shape and dtype, and a jitted train step does not recompile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clsvd_jax._src import linalg, matrix_axes, tree_paths

_HIGHEST = jax.lax.Precision.HIGHEST
SIDES = ("both", "left", "right", "block")

# What the projection's matmuls may be: a ``jax.lax.Precision``, a ``jax.lax.DotAlgorithmPreset``, or a name of
# either ("highest", "TF32_TF32_F32_X3"); None means the backend's default (``default_precision``).
PrecisionLike = Any


class Subspace(NamedTuple):
  """Protected subspace of one matrix or of a stack of matrices with leading batch axes.

  The matrix is the parameter's ``[..., out, in]`` view (``clsvd_jax.MatrixAxes`` says how a parameter stored
  otherwise, e.g. a Flax ``[in, out]`` kernel, is read), so ``left`` always spans outputs and ``right`` inputs.

  Attributes:
    left: ``[..., m, c_left]`` basis of the left (output, dim -2) side, zero-padded columns.
    right: ``[..., n, c_right]`` basis of the right (input, dim -1) side, zero-padded columns.
    left_allow: ``bool[...]``; True when ``left`` stores the allowed complement instead of the protected span.
    right_allow: ``bool[...]``; same for ``right``.
    rank: ``int32[...]``; number of protected directions per side.
  """

  left: jax.Array
  right: jax.Array
  left_allow: jax.Array
  right_allow: jax.Array
  rank: jax.Array

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.rank.shape)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return (self.left.shape[-2], self.right.shape[-2])

  @property
  def capacity(self) -> tuple[int, int]:
    return (self.left.shape[-1], self.right.shape[-1])


def default_capacity(m: int, n: int, max_rank_ratio: float = 1.0) -> tuple[int, int]:
  """Smallest per-side column counts that represent every protected rank up to ``max_rank_ratio * min(m, n)``.

  A side of dimension d stores k protected or d - k allowed columns, whichever is smaller, so ``d // 2`` columns
  always suffice, and ranks never exceed ``K = ceil(max_rank_ratio * min(m, n))``: capacity ``min(d // 2, K)``.
  Cost per matrix relative to W (m >= n, a = m / n, rho = K / n): ``min(rho, a/2) + min(rho, 1/2) / a``; that is
  exactly 1 for square matrices at the full range and at most 1 for rank caps up to about 0.8 on LLaMA's shapes,
  but up to 1.25 for a 2:1 matrix at the full range (docs/design.md §5: "no more than the weight" holds there only
  with a rank cap).
  """
  if not 0.0 < max_rank_ratio <= 1.0:
    raise ValueError(f"max_rank_ratio must lie in (0, 1], got {max_rank_ratio}")
  r = min(m, n)
  k_max = min(r, int(np.ceil(max_rank_ratio * r - 1e-9)))
  return (min(m // 2, k_max), min(n // 2, k_max))


def representable(rank: Any, dim: int, capacity: int) -> np.ndarray:
  """Whether a side of dimension ``dim`` with ``capacity`` columns can store ``rank`` protected directions."""
  rank = np.asarray(rank)
  return (rank <= capacity) | (dim - rank <= capacity)


def empty_subspace(shape: tuple[int, ...], *, capacity: tuple[int, int] | int | None = None,
                   max_rank_ratio: float = 1.0, dtype: Any = jnp.float32) -> Subspace:
  """A rank-0 subspace (projects nothing) for a matrix or stack of matrices of ``shape``."""
  if len(shape) < 2:
    raise ValueError(f"a subspace needs a matrix ([..., m, n]); got shape {tuple(shape)}")
  *batch, m, n = shape
  c_left, c_right = resolve_capacity(capacity, m, n, max_rank_ratio)
  batch = tuple(batch)
  return Subspace(
      left=jnp.zeros(batch + (m, c_left), dtype),
      right=jnp.zeros(batch + (n, c_right), dtype),
      left_allow=jnp.zeros(batch, jnp.bool_),
      right_allow=jnp.zeros(batch, jnp.bool_),
      rank=jnp.zeros(batch, jnp.int32),
  )


def resolve_capacity(capacity: tuple[int, int] | int | None, m: int, n: int,
                     max_rank_ratio: float = 1.0) -> tuple[int, int]:
  """Stored columns (left, right) for an m x n matrix: ``capacity`` (int, pair or None = ``default_capacity``).

  Raises:
    ValueError: for a capacity that is not a non-negative int or a pair of them.
  """
  if capacity is None:
    return default_capacity(m, n, max_rank_ratio)
  pair = (capacity, capacity) if isinstance(capacity, int | np.integer) else tuple(np.ravel(capacity).tolist())
  if len(pair) != 2 or not all(isinstance(c, int | np.integer) and not isinstance(c, bool) and c >= 0 for c in pair):
    raise ValueError(f"capacity must be a non-negative int or a pair (left, right) of them (stored columns per side); "
                     f"got {capacity!r}")
  c_left, c_right = (int(c) for c in pair)
  # More columns than the side's dimension can never be used.
  return (min(c_left, m), min(c_right, n))


# ---------------------------------------------------------------------------------------------------------------
# Projections (hot path: runs in every train step).
# ---------------------------------------------------------------------------------------------------------------


def default_precision(platform: str) -> Any:
  """The projection's matmul precision on ``platform`` (``cpu``, ``cuda``, ``rocm``, ``tpu``) when none is given.

  Why these (``benchmarks/precision.py``: the runner's ``invariant_max`` after 50 steps of ``constrained(adamw)``
  on a LLaMA-shaped stack, the accelerators' pass schemes emulated bit-exactly on CPU): float32 / bf16 x6 / TF32 x3
  leave 5.8e-7, bf16 x3 2.1e-6, single-pass TF32 1.7e-4 and single-pass bf16 1.3e-3 against the 1e-5 target.

  * ``tpu``: ``Precision.HIGH`` (3 bf16 passes, half the cost of HIGHEST's 6).
  * ``cuda``: ``TF32_TF32_F32_X3`` (3 TF32 tensor-core passes instead of float32 on the CUDA cores) on compute
    capability 8.0 and newer, where TF32 exists; ``Precision.HIGHEST`` on older GPUs, which refuse TF32 algorithms.
  * ``cpu``, ``rocm`` and anything else: ``Precision.HIGHEST`` (a CPU computes every precision in float32).
  """
  if platform == "tpu":
    return jax.lax.Precision.HIGH
  if platform == "cuda" and _cuda_has_tf32():
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return _HIGHEST


@functools.cache
def _cuda_has_tf32() -> bool:
  try:
    devices = jax.devices("cuda")
  except RuntimeError:  # no CUDA backend in this process: nothing to lower for
    return False
  return all(float(getattr(d, "compute_capability", 0) or 0) >= 8.0 for d in devices)


def check_precision(precision: PrecisionLike) -> PrecisionLike:
  """``precision`` as ``jax.lax.Precision`` / ``DotAlgorithmPreset`` (None stays None); a ValueError otherwise."""
  if precision is None or isinstance(precision, jax.lax.Precision | jax.lax.DotAlgorithmPreset):
    return precision
  if isinstance(precision, str):
    if precision in jax.lax.DotAlgorithmPreset.__members__:
      return jax.lax.DotAlgorithmPreset[precision]
    try:
      return jax.lax.Precision(precision)
    except ValueError:
      pass
  raise ValueError(f"precision={precision!r} is not a matmul precision: give None (the backend's default, see "
                   "clsvd_jax.default_precision), a jax.lax.Precision ('highest', 'high', 'default') or a "
                   "jax.lax.DotAlgorithmPreset name such as 'F32_F32_F32' or 'TF32_TF32_F32_X3'")


def _left_span(basis: jax.Array, g: jax.Array, precision: Any) -> jax.Array:
  """B B^T G over the left (dim -2) side."""
  coeff = jnp.einsum("...mc,...mn->...cn", basis, g, precision=precision)
  return jnp.einsum("...mc,...cn->...mn", basis, coeff, precision=precision)


def _right_span(basis: jax.Array, g: jax.Array, precision: Any) -> jax.Array:
  """G B B^T over the right (dim -1) side."""
  coeff = jnp.einsum("...mn,...nc->...mc", g, basis, precision=precision)
  return jnp.einsum("...mc,...nc->...mn", coeff, basis, precision=precision)


def _select(allow: jax.Array, span: jax.Array, g: jax.Array, *, keep_protected: bool) -> jax.Array:
  """Picks ``span`` or ``g - span`` per matrix, depending on what the side stores and what is wanted."""
  allow = allow[..., None, None]
  # The complement is the span of an allowed basis, or what remains after removing a protected span.
  complement = jnp.where(allow, span, g - span)
  if keep_protected:
    return g - complement
  return complement


def complement_left(s: Subspace, g: jax.Array, precision: PrecisionLike = _HIGHEST) -> jax.Array:
  """(I - U U^T) G."""
  return _select(s.left_allow, _left_span(s.left, g, precision), g, keep_protected=False)


def complement_right(s: Subspace, g: jax.Array, precision: PrecisionLike = _HIGHEST) -> jax.Array:
  """G (I - V V^T)."""
  return _select(s.right_allow, _right_span(s.right, g, precision), g, keep_protected=False)


def protected_left(s: Subspace, g: jax.Array, precision: PrecisionLike = _HIGHEST) -> jax.Array:
  """U U^T G."""
  return _select(s.left_allow, _left_span(s.left, g, precision), g, keep_protected=True)


def protected_right(s: Subspace, g: jax.Array, precision: PrecisionLike = _HIGHEST) -> jax.Array:
  """G V V^T."""
  return _select(s.right_allow, _right_span(s.right, g, precision), g, keep_protected=True)


def _project_f32(g32: jax.Array, s: Subspace, sides: str, precision: Any) -> jax.Array:
  if sides == "both":
    return complement_right(s, complement_left(s, g32, precision), precision)
  if sides == "left":
    return complement_left(s, g32, precision)
  if sides == "right":
    return complement_right(s, g32, precision)
  return g32 - protected_right(s, protected_left(s, g32, precision), precision)


def project(g: jax.Array, s: Subspace, sides: str = "both", precision: PrecisionLike = None) -> jax.Array:
  """Applies the projection variant ``sides`` to one update ``g`` ([..., m, n], same batch shape as ``s``).

  * ``both``: (I - UU^T) G (I - VV^T); invariant U^T dW = 0 and dW V = 0.
  * ``left``: (I - UU^T) G; invariant U^T dW = 0.
  * ``right``: G (I - VV^T); invariant dW V = 0.
  * ``block``: G - UU^T G VV^T; invariant U^T dW V = 0.

  The arithmetic runs in float32 (low-precision rounding would leak into the protected span) and the result is
  cast back to the update's dtype. A non-finite entry (NaN / Inf) stays where it is and the other entries are the
  projection of the finite ones: the sums over a row and a column would otherwise spread it over the whole matrix,
  so ``optax.zero_nans()`` or ``optax.apply_if_finite`` downstream still see one bad entry, and a rank-0 subspace
  returns ``g`` exactly.

  ``precision`` is the matmuls' precision; None picks the backend's (``default_precision``) when the program is
  lowered, so one jitted step serves every backend.
  """
  if sides not in SIDES:
    raise ValueError(f"unknown sides={sides!r}; expected one of {SIDES}")
  precision = check_precision(precision)
  dtype = g.dtype
  finite = jnp.isfinite(g)
  g32 = jnp.where(finite, g, 0).astype(jnp.float32)
  s = s._replace(left=s.left.astype(jnp.float32), right=s.right.astype(jnp.float32))
  if precision is None:
    per_platform = {p: functools.partial(_project_f32, sides=sides, precision=default_precision(p))
                    for p in ("cpu", "cuda", "tpu")}
    out = jax.lax.platform_dependent(g32, s, **per_platform, default=per_platform["cpu"])
  else:
    out = _project_f32(g32, s, sides, precision)
  return jnp.where(finite, out.astype(dtype), g)


def protected_basis(s: Subspace, side: str = "left") -> jax.Array:
  """The explicit orthonormal protected basis of one side, ``[..., d, d]`` with protected columns first.

  Columns past the rank are zero. Meant for tests and diagnostics: it costs a d x d eigendecomposition.
  """
  basis = s.left if side == "left" else s.right
  allow = s.left_allow if side == "left" else s.right_allow
  d = basis.shape[-2]
  proj = _projector(basis, allow)
  q = _sorted_eigvecs(proj)
  return q * (jnp.arange(d) < s.rank[..., None])[..., None, :]


# ---------------------------------------------------------------------------------------------------------------
# Computing and accumulating subspaces (task boundaries).
# ---------------------------------------------------------------------------------------------------------------


def _projector(basis: jax.Array, allow: jax.Array) -> jax.Array:
  """Dense projector onto the protected span of one side, ``[..., d, d]``."""
  d = basis.shape[-2]
  span = jnp.einsum("...dc,...ec->...de", basis, basis, precision=_HIGHEST)
  return jnp.where(allow[..., None, None], jnp.eye(d, dtype=basis.dtype) - span, span)


def _sorted_eigvecs(sym: jax.Array) -> jax.Array:
  """Eigenvectors of a symmetric PSD matrix, largest eigenvalue first."""
  _, vecs = linalg.eigh(sym)
  return vecs[..., ::-1]


def _store(q: jax.Array, k: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Packs an ordered orthonormal basis ``q`` [d, d] (protected first) into the stored form of one side."""
  d = q.shape[-1]
  allow = k > capacity
  cols = jnp.arange(capacity)
  protect_form = q[:, :capacity] * (cols < k)
  # Rolling by -k brings the allowed columns (k..d-1) to the front.
  allow_form = jnp.roll(q, -k, axis=-1)[:, :capacity] * (cols < d - k)
  return jnp.where(allow, allow_form, protect_form), allow


def _top_new_directions(gram: jax.Array, proj: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top ``count`` eigenvectors of the complement-projected PSD matrix ``(I - P) gram (I - P)`` and its spectrum."""
  c = gram - proj @ gram
  c = c - c @ proj
  evals, vecs = jnp.linalg.eigh(0.5 * (c + c.T))
  evals, vecs = evals[::-1], vecs[:, ::-1]
  return vecs * (jnp.arange(vecs.shape[-1]) < count), jnp.sqrt(jnp.maximum(evals, 0.0))


def _accumulate_one(w: jax.Array, k: jax.Array, prev: Subspace, capacity: tuple[int, int],
                    cov: jax.Array | None = None) -> tuple[Subspace, jax.Array]:
  """Grows one matrix's subspace to rank ``k`` (docs/design.md §3 and §4b).

  Returns the subspace and the spectrum the new directions were taken from: singular values of the complement
  part R (weights source) or square roots of the eigenvalues of the projected input covariance (activations).
  """
  w = w.astype(jnp.float32)
  proj_u = _projector(prev.left.astype(jnp.float32), prev.left_allow)
  proj_v = _projector(prev.right.astype(jnp.float32), prev.right_allow)
  count = k - prev.rank
  if cov is None:
    # Under two-sided updates W stays block-diagonal in the protected bases, so what is left to protect next is
    # the top of the complement part R = P(W); for a fresh model R = W.
    r_mat = w - proj_u @ w
    r_mat = r_mat - r_mat @ proj_v
    a, spectrum, bt = jnp.linalg.svd(r_mat, full_matrices=False)
    new = jnp.arange(a.shape[-1]) < count
    a_new, b_new = a * new, bt.T * new
  else:
    # Right: the input directions the finished tasks actually used; left: where W sends them (output covariance
    # W C W^T), i.e. the left singular directions of W C^{1/2}.
    cov = cov.astype(jnp.float32)
    b_new, spectrum = _top_new_directions(cov, proj_v, count)
    a_new, _ = _top_new_directions(w @ cov @ w.T, proj_u, count)
  # Zero singular values give arbitrary vectors; removing any overlap with the old span keeps P_new a projector.
  a_new = a_new - proj_u @ a_new
  b_new = b_new - proj_v @ b_new
  q_left = _sorted_eigvecs(proj_u + a_new @ a_new.T)
  q_right = _sorted_eigvecs(proj_v + b_new @ b_new.T)
  left, left_allow = _store(q_left, k, capacity[0])
  right, right_allow = _store(q_right, k, capacity[1])
  sub = Subspace(left, right, left_allow, right_allow, k.astype(jnp.int32))
  return sub, spectrum


@functools.partial(jax.jit, static_argnames=("capacity", "dtype"))
def accumulate(w: jax.Array, k: jax.Array, prev: Subspace, capacity: tuple[int, int], dtype: Any,
               cov: jax.Array | None = None) -> tuple[Subspace, jax.Array]:
  """Grows the subspaces of a stack of matrices ``w`` ([..., m, n]) to ranks ``k`` ([...]), in one program.

  The computation ``compute_subspaces`` runs per parameter after checking its input (and
  ``clsvd_jax.parallel.compute_subspaces_sharded`` per layer shard). Returns the new ``Subspace`` (bases in
  ``dtype``) and the spectrum the new directions came from, ``[..., min(m, n)]`` (``[..., n]`` with ``cov``).
  """
  batch = w.shape[:-2]
  # The batch size is spelled out: a zero-width basis (capacity 0) has no elements to infer it from.
  size = math.prod(batch)
  flat = lambda x, tail: x.reshape((size,) + x.shape[len(batch):]) if tail else x.reshape(size)
  wf = flat(w, True)
  kf = flat(k, False)
  pf = Subspace(flat(prev.left, True), flat(prev.right, True), flat(prev.left_allow, False),
                flat(prev.right_allow, False), flat(prev.rank, False))
  # Every stacked layer in one program: batched on accelerators, one matrix after another on CPU (``linalg``).
  if cov is None:
    sub, spectrum = linalg.map_matrices(lambda a, b, c: _accumulate_one(a, b, c, capacity), wf, kf, pf)
  else:
    sub, spectrum = linalg.map_matrices(lambda a, b, c, d: _accumulate_one(a, b, c, capacity, d), wf, kf, pf,
                                        flat(cov, True))
  unflat = lambda x: x.reshape(batch + x.shape[1:])
  sub = Subspace(unflat(sub.left).astype(dtype), unflat(sub.right).astype(dtype), unflat(sub.left_allow),
                 unflat(sub.right_allow), unflat(sub.rank))
  return sub, unflat(spectrum)




# ---------------------------------------------------------------------------------------------------------------
# Subspace trees in their stored forms.
#
# A subspace tree has one slot per parameter: a Subspace, None (unconstrained) or optax.MaskedNode (another
# optax.partition group owns it). Flax NNX stores slots in other containers: nnx.Optimizer wraps state leaves in
# OptArray / OptVariable Variables, a Subspace kept inside one Variable comes back from nnx.update as an nnx.State
# with the five field names, and nnx.state(model) wraps parameters in nnx.Param. These helpers read every form as a
# plain slot, and write new arrays back into whatever container held the old ones (same structure: a jitted step
# does not recompile).
# ---------------------------------------------------------------------------------------------------------------

_FIELDS = frozenset(Subspace._fields)


def _is_field_mapping(x: Any) -> bool:
  return isinstance(x, Mapping) and set(x.keys()) == _FIELDS


def is_slot(x: Any) -> bool:
  """``is_leaf`` for subspace trees: a slot in any of its stored forms."""
  x = tree_paths.unwrap(x)
  return x is None or isinstance(x, Subspace | optax.MaskedNode) or _is_field_mapping(x)


def as_slot(x: Any) -> Subspace | optax.MaskedNode | None:
  """A slot in any stored form as a plain ``Subspace`` of arrays, None or ``optax.MaskedNode``."""
  x = tree_paths.unwrap(x)
  if x is None or isinstance(x, optax.MaskedNode):
    return x
  if isinstance(x, Subspace):
    return Subspace(*(tree_paths.unwrap(f) for f in x))
  if _is_field_mapping(x):
    return Subspace(**{f: tree_paths.unwrap(x[f]) for f in Subspace._fields})
  raise TypeError(f"not a subspace slot: {type(x).__name__}")


def slots_by_path(tree: Any, what: str = "subspaces") -> dict[str, Any]:
  """``{path: Subspace | None | MaskedNode}`` of a subspace tree in any stored form.

  Raises:
    ValueError: naming the path, when a leaf is not a slot (e.g. a parameter where a subspace belongs).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_slot)
  out = {}
  for key_path, leaf in leaves:
    path = tree_paths.path_str(key_path)
    if not is_slot(leaf):
      raise ValueError(f"{what} hold a {type(leaf).__name__} of shape {np.shape(leaf)} at {path!r} where a "
                       "Subspace or None belongs; pass the tree returned by compute_subspaces or get_subspaces")
    out[path] = as_slot(leaf)
  return out


def subspaces_by_path(tree: Any) -> dict[str, Subspace]:
  """``{path: Subspace}`` of the slots of a subspace tree that hold one (None and masked slots left out)."""
  return {path: s for path, s in slots_by_path(tree).items() if isinstance(s, Subspace)}


def _field_of(key_path: tuple[Any, ...]) -> str:
  for key in reversed(key_path):
    name = tree_paths.key_str(key)
    if name in _FIELDS:
      return name
  raise ValueError(f"no Subspace field on the path {tree_paths.path_str(key_path)!r}")


def refill_slot(stored: Any, new: Subspace) -> Any:
  """``new``'s arrays in the containers of the stored slot ``stored`` (nnx Variables keep their metadata)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(stored)
  return jax.tree_util.tree_unflatten(treedef, [getattr(new, _field_of(p)) for p, _ in leaves])


# ---------------------------------------------------------------------------------------------------------------
# compute_subspaces: input checks around ``accumulate``.
# ---------------------------------------------------------------------------------------------------------------


def ranks_by_path(params: Any, ranks: Any) -> dict[str, Any]:
  """Normalises ``ranks`` (a pytree like params, or a dict keyed by path) to ``{path: rank or None}``."""
  param_paths = tree_paths.flatten_with_paths(params)
  if isinstance(ranks, Mapping) and ranks and all(isinstance(key, str) and "/" in key for key in ranks):
    by_path = dict(ranks)
  elif isinstance(ranks, Mapping) and ranks and set(ranks) <= set(param_paths):
    by_path = dict(ranks)
  else:
    by_path = tree_paths.flatten_with_paths(ranks, is_leaf=lambda x: x is None)
  unknown = sorted(set(by_path) - set(param_paths))
  if unknown:
    raise ValueError(f"ranks name parameters that do not exist: {unknown[:5]}; known parameters include "
                     f"{list(param_paths)[:8]}")
  return by_path




@jax.jit
def _finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all()


def _all_finite(x: Any) -> bool:
  return bool(_finite(x))


def _check_rank(path: str, k: Any, batch: tuple[int, ...], m: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
  try:
    k_arr = np.broadcast_to(np.asarray(k), batch)
  except ValueError:
    k_arr = None
  if k_arr is None or not np.issubdtype(np.asarray(k).dtype, np.integer):
    raise ValueError(f"rank for {path!r} must be an integer or an integer array of shape {batch} (one per stacked "
                     f"matrix); got {np.asarray(k)!r}")
  if (k_arr < 0).any() or (k_arr > min(m, n)).any():
    raise ValueError(f"rank for {path!r} must lie in [0, min(m, n)] = [0, {min(m, n)}] for shape {shape}; "
                     f"got {k_arr.tolist()}")
  return k_arr


def compute_subspaces(params: Any, ranks: Any, previous: Any = None, *,
                      capacity: tuple[int, int] | int | None = None, max_rank_ratio: float = 1.0,
                      dtype: Any = jnp.float32, return_singular_values: bool = False,
                      covariances: Mapping[str, Any] | None = None,
                      axes: matrix_axes.AxesSpec = None, solver: str = "exact") -> Any:
  """Protected subspaces for the selected matrices of ``params``.

  The SVD runs in float32. Without ``previous`` the protected directions are the top-k singular directions of each
  W. With ``previous`` the subspaces ACCUMULATE (docs/design.md §3): the result contains the old subspace exactly and
  adds the top ``k - k_old`` singular directions of the complement part ``(I - UU^T) W (I - VV^T)``.

  Args:
    params: pytree of parameters: nested dicts, ``nnx.state(model, nnx.Param)`` or ``nnx.to_pure_dict`` of it.
    ranks: protected counts: a pytree shaped like ``params`` whose leaves are ints / int arrays of the matrix's
      batch shape (e.g. ``[L]`` for a stack of L layers) or None for unconstrained leaves; or a dict
      ``{"path/to/param": rank}`` (paths as ``clsvd_jax.flatten_with_paths`` prints them).
    previous: the subspace tree of the previous task (as returned by this function or ``get_subspaces``, also
      straight from an ``nnx.Optimizer``'s ``opt_state``), or None. Parameters it has a subspace for and that get
      no rank keep that subspace.
    capacity: stored columns per side (int or (left, right)); default ``default_capacity(m, n)``. Ignored where
      ``previous`` fixes it, so shapes never change between tasks.
    max_rank_ratio: with the default capacity, the largest rank (as a fraction of min(m, n)) the bases must hold;
      the rank policy's cap (e.g. trr) keeps the bases smaller than the weights.
    dtype: dtype of the stored bases.
    return_singular_values: also return ``{path: spectrum}``: singular values of the complement part, or square
      roots of the eigenvalues of the projected input covariance (for energy ranks).
    covariances: basis source ``activations`` (docs/design.md §4b) for the paths it names: ``{path: [..., n, n]}``
      sums of x x^T over calibration inputs of each matrix (x the matrix's input of size n, ``axes`` says which axes
      of the parameter those are). New right (input) directions are the top eigenvectors of the covariance projected
      onto the complement; new left (output) directions those of the output covariance W C W^T. Other paths use
      the weights (the paper's source).
    axes: which axes of each parameter are its input and output (``clsvd_jax.MatrixAxes``; default: ``[in, out]``
      for a 2-D Flax ``kernel``, ``[..., out, in]`` otherwise). Give ``constrained`` the same.
    solver: ``exact`` (full SVD / eigh) or ``randomized`` (``clsvd_jax._src.randomized``: randomized subspace
      iteration for the new directions and QR assembly of the bases, no d x d solve; for large matrices).

  Returns:
    A tree shaped like ``params`` (nnx Variables unwrapped) with a ``Subspace`` of the ``[..., out, in]`` matrix at
    every selected parameter and None elsewhere (and the singular-value dict when asked).

  Raises:
    ValueError: naming the parameter, when a selected leaf is not a matrix, a rank is negative or exceeds
      min(m, n), ranks shrink from ``previous``, ``previous`` does not match ``params`` or names parameters it
      lacks, a weight or covariance holds NaN / Inf, a capacity is negative, or a rank does not fit the capacity.
  """
  if solver not in ("exact", "randomized"):
    raise ValueError(f"solver must be 'exact' or 'randomized', got {solver!r}")
  by_path = ranks_by_path(params, ranks)
  param_paths = tree_paths.flatten_with_paths(params)
  matrix_axes.check_axes_paths(axes, param_paths)
  prev_by_path = {} if previous is None else slots_by_path(previous, "previous")
  unknown_prev = sorted(p for p, s in prev_by_path.items() if isinstance(s, Subspace) and p not in param_paths)
  if unknown_prev:
    raise ValueError(f"previous holds subspaces for parameters that params lack: {unknown_prev[:5]}; pass the "
                     "same parameter tree the subspaces were computed for")
  singular_values = {}
  covariances = dict(covariances or {})
  unknown_cov = sorted(set(covariances) - {p for p, k in by_path.items() if k is not None})
  if unknown_cov:
    raise ValueError(f"covariances given for parameters without a rank: {unknown_cov[:5]}")

  def one(path: str, w: Any) -> Subspace | None:
    w = tree_paths.unwrap(w)
    k = by_path.get(path)
    prev = prev_by_path.get(path)
    if isinstance(prev, optax.MaskedNode):
      prev = None
    if k is None:
      # No new rank: a previous subspace carries over unchanged (subspaces never shrink).
      return prev
    shape = tuple(np.shape(w))
    if len(shape) < 2:
      raise ValueError(f"parameter {path!r} has shape {shape}: only matrices ([..., m, n]) can be constrained; "
                       "give it no rank (or change the parameter policy to freeze/train it)")
    lay = matrix_axes.resolve(path, shape, axes)
    batch, (m, n) = lay.batch_shape, lay.matrix_shape
    k_arr = _check_rank(path, k, batch, m, n, shape)
    if prev is not None:
      if tuple(prev.rank.shape) != batch or prev.matrix_shape != (m, n):
        raise ValueError(f"previous subspace of {path!r} is for shape {prev.rank.shape + prev.matrix_shape}, but "
                         f"the parameter has shape {lay.view_shape} as a [..., out, in] matrix (stored {shape})")
      prev_k = np.asarray(prev.rank)
      if (k_arr < prev_k).any():
        raise ValueError(f"ranks for {path!r} shrink from {prev_k.tolist()} to {k_arr.tolist()}: protected "
                         "subspaces only grow between tasks")
      cap = prev.capacity
    else:
      cap = resolve_capacity(capacity, m, n, max_rank_ratio)
      prev = empty_subspace(lay.view_shape, capacity=cap, dtype=jnp.float32)
    for side, dim, c in (("left", m, cap[0]), ("right", n, cap[1])):
      if not representable(k_arr, dim, c).all():
        raise ValueError(f"rank {k_arr.tolist()} of {path!r} does not fit the {side} capacity {c} (dimension "
                         f"{dim}): a side stores min(k, dim - k) columns; use capacity >= {dim // 2}")
    cov = covariances.get(path)
    if cov is not None and tuple(np.shape(cov)) != batch + (n, n):
      raise ValueError(f"input covariance of {path!r} has shape {tuple(np.shape(cov))}; expected "
                       f"{batch + (n, n)} (one n x n matrix per stacked matrix, n = its input size)")
    w_mat = matrix_axes.to_matrix(jnp.asarray(w), lay)
    if not _all_finite(w_mat):
      raise ValueError(f"parameter {path!r} holds NaN or Inf: its subspace would be meaningless; restore the "
                       "weights from a checkpoint taken before the loss diverged")
    if cov is not None and not _all_finite(jnp.asarray(cov)):
      raise ValueError(f"input covariance of {path!r} holds NaN or Inf: the calibration pass overflowed or saw "
                       "non-finite activations")
    if solver == "randomized":
      from clsvd_jax._src import randomized  # imports this module

      sub, svals = randomized.accumulate(w_mat, k_arr, prev, dtype, cov)
    else:
      sub, svals = accumulate(w_mat, jnp.asarray(k_arr, jnp.int32), prev, tuple(cap), dtype,
                              None if cov is None else jnp.asarray(cov))
    singular_values[path] = svals
    return sub

  out = tree_paths.map_with_paths(one, params, is_leaf=tree_paths.is_variable)
  if return_singular_values:
    return out, singular_values
  return out
