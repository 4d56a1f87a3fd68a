"""LoRA adapters on chosen matrices of either model family: sequential LoRA (``lora``) and O-LoRA (``olora``).

An adapter of a matrix W ``[..., m, n]`` (layers stacked on the leading axes, as the models store them) is a pair
``A [..., r, n]``, ``B [..., m, r]``; the model sees ``W + (alpha / r) * B A``. Nothing in the model code changes:
``merge(base, adapters, scale)`` maps the frozen base parameters and the adapters to effective parameters, inside
the jitted loss (``apply_fn(merge(base, adapters, scale), *batch)``) or once for export (``export_merged``).

Adapters live in ``S`` slots with static shapes (``LoraFactors.a`` is ``[S, ..., r, n]``): sequential LoRA uses one
slot for every task; O-LoRA gives task t its own slot t and freezes the slots of finished tasks. The effective
weight sums all slots (unused slots have ``B = 0``, so they add nothing), so moving to the next task changes data,
not shapes, and the jitted step never recompiles. ``only_active_slot(inner)`` wraps the optimizer so that every slot
but the active one gets a zero update (gradient and final update both masked: Adam's moments of a finished slot
would otherwise keep moving it); ``set_active_slot`` switches slots at a task boundary.

O-LoRA's loss (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning") adds, for
the active slot t,

    lambda1 * sum_{i < t} sum_{j,k} |(A_i A_t^T)_{jk}|      (orthogonality of the new rows of A to the old ones)
  + lambda2 * sum (||A_t||_F + ||B_t||_F)                   (per matrix, i.e. per layer of a stack)

as the reference implementation computes it (read in the TRACE benchmark's ``model/Regular/O_LoRA.py``): absolute
entries and plain (not squared) Frobenius norms of each adapted module's new A and B. The paper's equation writes
the orthogonality term with squared entries; ``orthogonality="squared"`` gives that variant. That file defaults to
lambda1 = 0.5, lambda2 = 0.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clsvd_jax import models
from clsvd_jax._src import tree_paths

# O-LoRA's targets: the query and value projections (T5's cross-attention included, as PEFT's "q", "v" match it).
DEFAULT_TARGETS = (r"(^|/)(self_attn|cross_attn)/(q|v|q_proj|v_proj)/weight$",)


class LoraFactors(NamedTuple):
  """The adapters of one (stacked) matrix W ``[..., m, n]``.

  Attributes:
    a: ``[S, ..., r, n]``: slot s's down-projection.
    b: ``[S, ..., m, r]``: slot s's up-projection (zero at initialisation).
  """

  a: jax.Array
  b: jax.Array


@dataclasses.dataclass(frozen=True)
class LoraOptions:
  """Settings of ``lora`` / ``olora``.

  Attributes:
    rank: r, the rank of each slot's adapter.
    alpha: the update is scaled by ``alpha / rank``.
    targets: regexes over parameter paths (``clsvd_jax.flatten_with_paths`` form) of the adapted matrices.
    lambda1: weight of O-LoRA's orthogonality penalty.
    lambda2: weight of O-LoRA's norm penalty on the active adapter.
    orthogonality: ``abs`` (the reference code) or ``squared`` (the paper's equation).
  """

  rank: int = 8
  alpha: float = 32.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  lambda1: float = 0.5
  lambda2: float = 0.0
  orthogonality: Literal["abs", "squared"] = "abs"

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be a positive integer, got {self.rank}")
    if self.orthogonality not in ("abs", "squared"):
      raise ValueError(f"lora.orthogonality {self.orthogonality!r}: expected 'abs' or 'squared'")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"lora.targets: {pattern!r} is not a valid regex: {e}") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_shapes(shapes: Mapping[str, Sequence[int]], targets: Sequence[str] = DEFAULT_TARGETS
                  ) -> dict[str, tuple[int, ...]]:
  """The matrices (``{path: shape}``, e.g. ``clsvd_jax.models.constrained_matrices(model)``) the targets select.

  Raises:
    ValueError: when nothing matches (naming the patterns and some paths).
  """
  out = {p: tuple(s) for p, s in shapes.items() if any(re.search(t, p) for t in targets)}
  if not out:
    raise ValueError(f"lora.targets {list(targets)} match none of the matrices; paths include {list(shapes)[:6]}")
  bad = [p for p, s in out.items() if len(s) < 2]
  if bad:
    raise ValueError(f"lora.targets select non-matrix parameters {bad[:3]}; narrow the patterns")
  return out


def init_adapters(key: jax.Array, shapes: Mapping[str, Sequence[int]], *, rank: int, slots: int = 1,
                  dtype: Any = jnp.float32) -> dict[str, LoraFactors]:
  """Fresh adapters for ``slots`` tasks: ``A`` uniform in ``[-1/sqrt(n), 1/sqrt(n)]`` (PEFT's kaiming-uniform
  default), ``B = 0``, so every slot starts as a zero update."""
  out = {}
  for i, (path, shape) in enumerate(sorted(shapes.items())):
    *batch, m, n = shape
    bound = 1.0 / float(n) ** 0.5
    a = jax.random.uniform(jax.random.fold_in(key, i), (slots, *batch, rank, n), dtype, -bound, bound)
    out[path] = LoraFactors(a, jnp.zeros((slots, *batch, m, rank), dtype))
  return out


def delta(factors: LoraFactors, scale: float) -> jax.Array:
  """``scale * sum_s B_s A_s`` ``[..., m, n]``, in float32."""
  a, b = factors.a.astype(jnp.float32), factors.b.astype(jnp.float32)
  return scale * jnp.einsum("s...mr,s...rn->...mn", b, a, precision=jax.lax.Precision.HIGHEST)


def merge(base: Any, adapters: Mapping[str, LoraFactors], scale: float) -> Any:
  """The effective parameters: ``W + delta`` at every adapted path, the other leaves as they are (jittable).

  Raises:
    ValueError: when an adapter names a parameter ``base`` lacks or has another shape.
  """
  flat = tree_paths.flatten_with_paths(base)
  for path, f in adapters.items():
    if path not in flat:
      raise ValueError(f"LoRA adapter for {path!r}, which the model does not have; parameters include "
                       f"{list(flat)[:5]}")
    want = tuple(jnp.shape(flat[path]))
    got = f.b.shape[1:-1] + f.a.shape[-1:]
    if got != want:
      raise ValueError(f"LoRA adapter of {path!r} is for shape {got}, the parameter has shape {want}")

  def one(path: str, w: Any) -> Any:
    f = adapters.get(path)
    if f is None:
      return w
    return (w.astype(jnp.float32) + delta(f, scale)).astype(w.dtype)

  return tree_paths.map_with_paths(one, base)


def _slot_mask(n: int, active: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return (jnp.arange(n) == active).reshape((n,) + (1,) * (len(shape) - 1))


def _safe_norm(x: jax.Array, axes: tuple[int, int]) -> jax.Array:
  """Frobenius norm over ``axes`` with a zero (not NaN) gradient at 0, as torch's ``norm`` has: a fresh ``B`` is 0."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def orthogonality_penalty(adapters: Mapping[str, LoraFactors], active: Any, *,
                          kind: Literal["abs", "squared"] = "abs") -> jax.Array:
  """``sum over matrices and layers, i < active`` of ``sum |A_i A_active^T|`` (or squared entries).

  Old slots enter through ``stop_gradient``: they are frozen, only the active adapter is pushed away from them.
  """
  total = jnp.zeros((), jnp.float32)
  for f in adapters.values():
    a = f.a.astype(jnp.float32)
    a_new = jnp.take(a, active, axis=0)
    prod = jnp.einsum("s...rn,...qn->s...rq", jax.lax.stop_gradient(a), a_new, precision=jax.lax.Precision.HIGHEST)
    entries = jnp.abs(prod) if kind == "abs" else jnp.square(prod)
    older = (jnp.arange(a.shape[0]) < active).reshape((-1,) + (1,) * (prod.ndim - 1))
    total = total + jnp.sum(jnp.where(older, entries, 0.0))
  return total


def norm_penalty(adapters: Mapping[str, LoraFactors], active: Any) -> jax.Array:
  """``sum over matrices and layers`` of ``||A_active||_F + ||B_active||_F``."""
  total = jnp.zeros((), jnp.float32)
  for f in adapters.values():
    total = total + jnp.sum(_safe_norm(jnp.take(f.a, active, axis=0), (-2, -1)))
    total = total + jnp.sum(_safe_norm(jnp.take(f.b, active, axis=0), (-2, -1)))
  return total


def olora_penalty(adapters: Mapping[str, LoraFactors], active: Any, options: LoraOptions) -> jax.Array:
  """O-LoRA's regulariser (module docstring); add it to the task loss (jittable, ``active`` may be traced)."""
  out = jnp.zeros((), jnp.float32)
  if options.lambda1:
    out = out + options.lambda1 * orthogonality_penalty(adapters, active, kind=options.orthogonality)
  if options.lambda2:
    out = out + options.lambda2 * norm_penalty(adapters, active)
  return out


class SlotState(NamedTuple):
  """State of ``only_active_slot``: the slot being trained and the wrapped optimizer's state."""

  active: jax.Array
  inner_state: optax.OptState


def only_active_slot(inner: optax.GradientTransformation, *, active: int = 0
                     ) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer over an adapter tree (every leaf has the slot axis first) so that only slot ``active``
  moves: the incoming gradient and the final update are both zero elsewhere. The second mask is what freezes a
  finished slot: its Adam moments are not zero, and weight decay would shrink it."""
  inner = optax.with_extra_args_support(inner)

  def mask(tree: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda u: jnp.where(_slot_mask(u.shape[0], slot, u.shape), u, jnp.zeros_like(u)), tree)

  def init_fn(params: Any) -> SlotState:
    return SlotState(jnp.asarray(active, jnp.int32), inner.init(params))

  def update_fn(updates: Any, state: SlotState, params: Any = None, **extra_args: Any):
    updates, inner_state = inner.update(mask(updates, state.active), state.inner_state, params, **extra_args)
    return mask(updates, state.active), SlotState(state.active, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_active_slot(opt_state: Any, slot: int) -> Any:
  """``opt_state`` with every ``SlotState`` switched to ``slot`` (same shapes: a jitted step does not recompile).

  Raises:
    ValueError: when ``opt_state`` holds no ``only_active_slot`` state.
  """
  found = []

  def swap(x: Any) -> Any:
    if isinstance(x, SlotState):
      found.append(x)
      return x._replace(active=jnp.asarray(slot, jnp.int32))
    return x

  out = jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, SlotState))
  if not found:
    raise ValueError("opt_state holds no only_active_slot() state: build the adapter optimizer with "
                     "clsvd_jax.methods.lora.only_active_slot(...)")
  return out


def export_merged(model: Any, base: Any, adapters: Mapping[str, LoraFactors], scale: float, path: str | Path,
                  **save_kwargs: Any) -> list[Path]:
  """Merges the adapters into ``model`` (in place) and writes it with ``clsvd_jax.models.save_pretrained``: a plain
  checkpoint of the family's format that transformers loads without PEFT."""
  models.update_model(model, merge(base, adapters, scale))
  return models.save_pretrained(model, path, **save_kwargs)
