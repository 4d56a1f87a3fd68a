"""Readable string paths for pytree leaves.

Parameter policies, rank tables and error messages all name parameters by one string form, ``"a/b/c"``, so a
regex written by a user matches the same text everywhere (nested dicts, ``nnx.State``, optax states).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def key_str(key: Any) -> str | None:
  """One pytree key as text (None for the ``value`` attribute of nnx Variables)."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    # nnx Variables flatten to their ``value``; the attribute adds nothing a user would type.
    return None if key.name == "value" else key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def is_variable(x: Any) -> bool:
  """An ``nnx.Variable`` (Param, OptArray, OptVariable, ...): a box around one value."""
  return isinstance(x, nnx.Variable)


def unwrap(x: Any) -> Any:
  """The value inside (nested) nnx Variables; anything else as it is."""
  while isinstance(x, nnx.Variable):
    x = x.get_value()
  return x


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a pytree key path into ``"a/b/c"``."""
  parts = (key_str(k) for k in path)
  return "/".join(p for p in parts if p is not None)


def flatten_with_paths(tree: Any, is_leaf: Any = None) -> dict[str, Any]:
  """Returns ``{path_str: leaf}`` for every leaf of ``tree`` (insertion order = flatten order)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(p): leaf for p, leaf in leaves}


def map_with_paths(fn: Any, tree: Any, *rest: Any, is_leaf: Any = None) -> Any:
  """``jax.tree.map`` whose function also receives the leaf's string path as first argument."""
  return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest, is_leaf=is_leaf)
