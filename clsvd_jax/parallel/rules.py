"""Sharding trees from the partition rules: parameters, batches and activations on a mesh (docs/design.md §10).

The rules and their matcher (``spec_for``: first matching regex, spec of the trailing dims, divisibility
fallbacks) live in the leaf module ``clsvd_jax._src.partition_rules``, which the models use too; they are
re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clsvd_jax._src import tree_paths
from clsvd_jax._src.partition_rules import (
    COL,
    DEFAULT_AXIS_MAP,
    DEFAULT_RULES,
    LLAMA_RULES,
    REPLICATED,
    ROW,
    T5_RULES,
    Fallback,
    Rule,
    SpecEntry,
    axis_sizes,
    fit_spec,
    spec_for,
)

__all__ = [
    "BATCH_AXES", "COL", "DEFAULT_AXIS_MAP", "DEFAULT_RULES", "LLAMA_RULES", "REPLICATED", "ROW", "T5_RULES",
    "Fallback", "Rule", "SpecEntry", "activation_sharding", "batch_shardings", "batch_spec", "fit_spec",
    "param_shardings", "param_specs", "shard_params", "spec_for",
]

log = logging.getLogger(__name__)


def param_specs(params: Any, mesh: Mesh | Mapping[str, int], rules: Sequence[Rule] = DEFAULT_RULES, *,
                axis_map: Mapping[str, Any] | None = None, unmatched: str = "fsdp", min_shard_size: int = 2**16,
                return_report: bool = False) -> Any:
  """A tree of PartitionSpecs shaped like ``params`` (leaves may be arrays or ``jax.ShapeDtypeStruct``)."""
  notes: list[Fallback] = []

  def one(path: str, p: Any) -> PartitionSpec:
    return spec_for(path, np.shape(p), mesh, rules, axis_map=axis_map, unmatched=unmatched,
                    min_shard_size=min_shard_size, notes=notes)

  specs = tree_paths.map_with_paths(one, params)
  if notes:
    log.warning("partition rules: %d parameter(s) less sharded than asked:\n  %s", len(notes),
                "\n  ".join(str(n) for n in notes))
  if return_report:
    return specs, notes
  return specs


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, *,
                    axis_map: Mapping[str, Any] | None = None, unmatched: str = "fsdp", min_shard_size: int = 2**16,
                    return_report: bool = False) -> Any:
  """A tree of ``NamedSharding`` shaped like ``params``; see ``spec_for`` for the arguments.

  With ``return_report`` also returns the list of ``Fallback`` notes (dims replicated because their size does not
  divide the mesh axes, parameters no rule names).
  """
  specs, notes = param_specs(params, mesh, rules, axis_map=axis_map, unmatched=unmatched,
                             min_shard_size=min_shard_size, return_report=True)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if return_report:
    return shardings, notes
  return shardings


def shard_params(params: Any, shardings: Any) -> Any:
  """Places (or reshards) ``params`` onto ``shardings`` (a tree of shardings shaped like params)."""
  return jax.device_put(params, shardings)


BATCH_AXES = ("data", "fsdp")


def batch_spec(ndim: int, batch_axes: Sequence[str] = BATCH_AXES) -> PartitionSpec:
  """Batch arrays split their leading (example) dim over ``data`` x ``fsdp``; other dims stay whole."""
  if ndim < 1:
    raise ValueError("a batch array needs a leading batch dim; got a scalar")
  return PartitionSpec(tuple(batch_axes), *([None] * (ndim - 1)))


def batch_shardings(mesh: Mesh, batch: Any, batch_axes: Sequence[str] = BATCH_AXES) -> Any:
  """A tree of ``NamedSharding`` for ``batch`` (arrays or ShapeDtypeStructs with the batch on dim 0).

  Raises:
    ValueError: naming the array, when its batch size is not a multiple of the ``data x fsdp`` device count.
  """
  sizes = axis_sizes(mesh)
  total = int(np.prod([sizes[a] for a in batch_axes]))

  def one(path: str, x: Any) -> NamedSharding:
    shape = np.shape(x)
    if not shape or shape[0] % total:
      raise ValueError(f"batch array {path or '<batch>'!r} has shape {tuple(shape)}: its leading (batch) dim must be "
                       f"a multiple of {' x '.join(batch_axes)} = {total} devices; change the batch size or the mesh")
    return NamedSharding(mesh, batch_spec(len(shape), batch_axes))

  return tree_paths.map_with_paths(one, batch)


def activation_sharding(mesh: Mesh, ndim: int = 3, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Sharding for activations ``[B, T, ...]`` inside a model (batch split like the inputs), for
  ``jax.lax.with_sharding_constraint`` where XLA's propagation needs help (e.g. after a scan over layers)."""
  return NamedSharding(mesh, batch_spec(ndim, batch_axes))
