"""Partition rules and their matcher: which mesh axes shard which dimension of each parameter (docs/design.md §10).

A rule is ``(regex, spec)``: the first regex that ``re.search``-es the parameter path (``"layers/mlp/up_proj/weight"``)
gives the spec of the parameter's TRAILING dimensions; leading dimensions not covered (the stacked layer axis
``L`` of ``[L, out, in]``) stay unsharded, so one rule serves stacked and unstacked weights and a scan over layers
never gathers across devices. Spec entries are None, a logical axis name or a tuple of names; the logical names
``fsdp`` and ``tensor`` map to mesh axes through ``axis_map`` (e.g. ``{"fsdp": ("data", "fsdp")}`` shards
parameters over the data axis too, ZeRO-3 style).

Weights are stored [out, in] (y = x @ W.T). Column-parallel matrices (q, k, v, gate, up, wi) put ``tensor`` on the
output dim and ``fsdp`` on the input dim; row-parallel ones (o, down, wo) the reverse, so the activations between
them stay split by heads / hidden units. A dimension whose size does not divide its mesh axes falls back to
replication for that dimension; every fallback is recorded.

A leaf module (JAX and NumPy only): the models place the tensors they load with it and ``clsvd_jax.parallel``
builds its sharding trees on it, so neither package imports the other.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh, PartitionSpec

# The mesh axes every rule of the project names (``clsvd_jax.parallel.mesh`` builds meshes with them).
AXES = ("data", "fsdp", "tensor")

SpecEntry = None | str | tuple[str, ...]
Rule = tuple[str, tuple[SpecEntry, ...]]

COL = ("tensor", "fsdp")  # [out, in] with out split by heads / hidden units
ROW = ("fsdp", "tensor")  # [out, in] with in split by heads / hidden units
REPLICATED: tuple[SpecEntry, ...] = ()

LLAMA_RULES: tuple[Rule, ...] = (
    (r"(^|/)embed_tokens/embedding$", ("tensor", "fsdp")),
    (r"(^|/)lm_head/weight$", ("tensor", "fsdp")),
    (r"(^|/)self_attn/(q|k|v)_proj/weight$", COL),
    (r"(^|/)self_attn/(q|k|v)_proj/bias$", ("tensor",)),
    (r"(^|/)self_attn/o_proj/weight$", ROW),
    (r"(^|/)mlp/(gate|up)_proj/weight$", COL),
    (r"(^|/)mlp/(gate|up)_proj/bias$", ("tensor",)),
    (r"(^|/)mlp/down_proj/weight$", ROW),
    (r"(^|/)(o_proj|down_proj)/bias$", REPLICATED),
    (r"(^|/)(input_layernorm|post_attention_layernorm|norm)/scale$", REPLICATED),
)

T5_RULES: tuple[Rule, ...] = (
    (r"(^|/)shared/embedding$", ("tensor", "fsdp")),
    (r"(^|/)(self_attn|cross_attn)/(q|k|v)/weight$", COL),
    (r"(^|/)(self_attn|cross_attn)/o/weight$", ROW),
    (r"(^|/)mlp/(wi|wi_0|wi_1)/weight$", COL),
    (r"(^|/)mlp/wo/weight$", ROW),
    # [num_buckets, heads]: a few kB.
    (r"(^|/)relative_attention_bias/embedding$", REPLICATED),
    (r"(^|/)(self_attn_norm|cross_attn_norm|mlp_norm|final_norm)/scale$", REPLICATED),
)

# The two families' paths never collide, so one rule set serves both.
DEFAULT_RULES: tuple[Rule, ...] = LLAMA_RULES + T5_RULES

DEFAULT_AXIS_MAP: dict[str, tuple[str, ...]] = {"fsdp": ("fsdp",), "tensor": ("tensor",)}


@dataclasses.dataclass(frozen=True)
class Fallback:
  """One decision that left a parameter less sharded than its rule asked (or a parameter no rule named)."""

  path: str
  dim: int | None
  size: int | None
  axes: tuple[str, ...]
  reason: str

  def __str__(self) -> str:
    where = f"{self.path} dim {self.dim} (size {self.size})" if self.dim is not None else self.path
    return f"{where}: {self.reason}"


def axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
  if isinstance(mesh, Mesh):
    return {name: int(size) for name, size in mesh.shape.items()}
  return {a: int(mesh.get(a, 1)) for a in AXES} | {k: int(v) for k, v in mesh.items()}


def normalize_axis_map(axis_map: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
  out = dict(DEFAULT_AXIS_MAP)
  for k, v in (axis_map or {}).items():
    out[k] = (v,) if isinstance(v, str) else tuple(v)
  return out


def mesh_axes(entry: SpecEntry, axis_map: Mapping[str, tuple[str, ...]], sizes: Mapping[str, int],
               rule: str) -> tuple[str, ...]:
  """Mesh axes for one spec entry (logical names resolved, mesh names passed through)."""
  if entry is None:
    return ()
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  out: list[str] = []
  for name in names:
    for axis in axis_map.get(name, (name,)):
      if axis not in sizes:
        raise ValueError(f"partition rule {rule!r}: axis {name!r} maps to mesh axis {axis!r}, which the mesh "
                         f"{dict(sizes)} lacks; use one of {tuple(sizes)}")
      out.append(axis)
  return tuple(out)


def spec_entry(axes: tuple[str, ...]) -> SpecEntry:
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def fit_spec(path: str, shape: Sequence[int], trailing: Sequence[SpecEntry], mesh: Mesh | Mapping[str, int], *,
             axis_map: Mapping[str, Any] | None = None, rule: str = "",
             notes: list[Fallback] | None = None) -> PartitionSpec:
  """The PartitionSpec of an array of ``shape`` from a spec for its trailing dims, with divisibility fallbacks.

  Args:
    path: the parameter's path (for messages).
    shape: the array's shape.
    trailing: spec entries for the last ``len(trailing)`` dims; leading dims are unsharded.
    mesh: a Mesh or ``{axis: size}``.
    axis_map: logical name -> mesh axes (default ``fsdp -> fsdp``, ``tensor -> tensor``).
    rule: the rule's regex (for messages).
    notes: a list that receives a ``Fallback`` for every dimension left unsharded because its size does not
      divide its mesh axes, or because a mesh axis was already used by an earlier dimension.
  """
  sizes = axis_sizes(mesh)
  amap = normalize_axis_map(axis_map)
  shape = tuple(int(s) for s in shape)
  if len(trailing) > len(shape):
    raise ValueError(f"partition rule {rule!r} gives {len(trailing)} dims {tuple(trailing)} but {path!r} has shape "
                     f"{shape}; write the rule for the trailing dims only")
  entries: list[SpecEntry] = [None] * (len(shape) - len(trailing))
  used: set[str] = set()
  for dim, entry in enumerate(trailing, start=len(shape) - len(trailing)):
    axes = mesh_axes(entry, amap, sizes, rule)
    if not axes:
      entries.append(None)
      continue
    reused = [a for a in axes if a in used]
    if reused:
      if notes is not None:
        notes.append(Fallback(path, dim, shape[dim], axes, f"mesh axes {reused} already shard another dim"))
      entries.append(None)
      continue
    total = int(np.prod([sizes[a] for a in axes]))
    if shape[dim] % total:
      if notes is not None:
        notes.append(Fallback(path, dim, shape[dim], axes,
                              f"size does not divide {' x '.join(axes)} = {total}: replicated on that dim"))
      entries.append(None)
      continue
    used.update(axes)
    entries.append(spec_entry(axes))
  return PartitionSpec(*entries)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh | Mapping[str, int], rules: Sequence[Rule] = DEFAULT_RULES,
             *, axis_map: Mapping[str, Any] | None = None, unmatched: str = "fsdp", min_shard_size: int = 2**16,
             notes: list[Fallback] | None = None) -> PartitionSpec:
  """PartitionSpec of one parameter.

  Args:
    path: the parameter path.
    shape: its shape.
    mesh: a Mesh or ``{axis: size}`` (sizes only: memory estimates need no devices).
    rules: ``(regex, trailing spec)`` pairs; the first match wins.
    axis_map: logical axis -> mesh axes.
    unmatched: for parameters no rule names: ``fsdp`` shards the largest dim the fsdp axes divide (arrays smaller
      than ``min_shard_size`` elements stay replicated), ``replicate`` replicates, ``error`` raises.
    min_shard_size: see ``unmatched``.
    notes: receives the fallbacks (see ``fit_spec``) and one entry per unmatched parameter.
  """
  for pattern, trailing in rules:
    if re.search(pattern, path):
      return fit_spec(path, shape, trailing, mesh, axis_map=axis_map, rule=pattern, notes=notes)
  if unmatched == "error":
    raise ValueError(f"no partition rule matches parameter {path!r} of shape {tuple(shape)}; add a rule "
                     "(regex, spec) for it or pass unmatched='replicate' / 'fsdp'")
  if unmatched not in ("fsdp", "replicate"):
    raise ValueError(f"unmatched={unmatched!r}: expected 'fsdp', 'replicate' or 'error'")
  size = int(np.prod(shape)) if len(shape) else 1
  if unmatched == "replicate" or size < min_shard_size or not len(shape):
    if notes is not None and size >= min_shard_size:
      notes.append(Fallback(path, None, None, (), "no rule matches: replicated"))
    return PartitionSpec(*([None] * len(shape)))
  sizes = axis_sizes(mesh)
  axes = mesh_axes("fsdp", normalize_axis_map(axis_map), sizes, "<unmatched>")
  total = int(np.prod([sizes[a] for a in axes]))
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % total == 0:
      if notes is not None:
        notes.append(Fallback(path, dim, shape[dim], axes, "no rule matches: sharded on its largest dim over fsdp"))
      entries = [None] * len(shape)
      entries[dim] = spec_entry(axes)
      return PartitionSpec(*entries)
  if notes is not None:
    notes.append(Fallback(path, None, None, axes, f"no rule matches and no dim divides {total}: replicated"))
  return PartitionSpec(*([None] * len(shape)))
