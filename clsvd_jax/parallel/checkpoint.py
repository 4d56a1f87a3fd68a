"""Orbax checkpoints of sharded training state, restorable onto a mesh of another shape (docs/design.md §10).

Every process calls ``save_sharded`` with the same global arrays; Orbax writes each shard once (from the process
that holds it), so the directory must be shared by the hosts (a bucket on a pod). ``restore_sharded`` reads into
whatever shardings the target names: a checkpoint saved on 8 devices resumes on 4, on 1, or on another pod.

The state is stored as a nested dict keyed by its string paths (``clsvd_jax.flatten_with_paths``), so any pytree
saves the same way (optax NamedTuples, ``Subspace`` nodes, None and ``MaskedNode`` gaps) and the restore rebuilds
the target's own structure: old checkpoints stay readable when a state class changes its Python type.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Sharding

from clsvd_jax._src import tree_paths


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    parts = path.split("/") if path else ["_"]
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = leaf
  return out


def _flat(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in nested.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      out.update(_flat(value, path))
    else:
      out[path] = value
  return out


def abstract_state(state: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves with the given shardings, shaped like ``state`` (arrays or abstract).

  Args:
    state: a pytree of arrays or ShapeDtypeStructs (e.g. ``jax.eval_shape(tx.init, params)``).
    shardings: a matching tree of shardings (``param_shardings`` / ``opt_state_shardings`` on the new mesh), or
      one sharding for every leaf.
  """
  if isinstance(shardings, Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)


def save_sharded(directory: str | os.PathLike, state: Any, *, force: bool = True) -> None:
  """Writes ``state`` (a pytree of jax arrays, possibly spanning hosts) to ``directory``; all processes call it.

  Args:
    directory: an absolute path or a ``gs://`` URL; the last component is created and must not exist unless
      ``force``.
    state: e.g. ``{"params": params, "opt_state": opt_state, "step": step}``.
    force: overwrite an existing checkpoint.
  """
  flat = tree_paths.flatten_with_paths(state)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(_abs(directory), _nested(flat), force=force)
  ckpt.wait_until_finished()


def restore_sharded(directory: str | os.PathLike, target: Any) -> Any:
  """Reads a checkpoint into the layout ``target`` asks for.

  Args:
    directory: what ``save_sharded`` wrote.
    target: a pytree shaped like the saved state whose leaves are ``jax.ShapeDtypeStruct`` with a ``sharding``
      (``abstract_state(state, shardings)``); the mesh may differ from the one that saved.

  Returns:
    The state with ``target``'s structure, every array laid out as its target says.

  Raises:
    ValueError: naming the paths, when the checkpoint lacks leaves of ``target`` or shapes differ.
  """
  flat_target = tree_paths.flatten_with_paths(target)
  ckpt = ocp.StandardCheckpointer()
  path = _abs(directory)
  meta = ckpt.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  saved = _flat(dict(getattr(meta, "tree", meta)))
  missing = sorted(set(flat_target) - set(saved))
  if missing:
    raise ValueError(f"checkpoint {path} lacks {len(missing)} leaves of the target, e.g. {missing[:5]}; it was saved "
                     f"from another model / optimizer (it holds e.g. {sorted(saved)[:5]})")
  bad = [f"{p}: saved {tuple(saved[p].shape)}, target {tuple(t.shape)}" for p, t in flat_target.items()
         if getattr(saved[p], "shape", None) is not None and tuple(saved[p].shape) != tuple(t.shape)]
  if bad:
    raise ValueError(f"checkpoint {path} does not fit the target: {bad[:5]}")
  restored = _flat(ckpt.restore(path, _nested(flat_target), strict=False))
  leaves = [restored[p] for p in flat_target]
  return jax.tree.unflatten(jax.tree.structure(target), leaves)


def _abs(directory: str | os.PathLike) -> Any:
  text = os.fspath(directory)
  if "://" in text:
    return text
  return os.path.abspath(text)
