"""What the T5 and LLaMA families share around the network: parameter trees (shapes, checks, random init), the map
between stacked parameters and Hugging Face tensor names, shardings of loaded tensors, writing parameters back
into a model, and the argument handling of greedy decoding. The network itself is in ``clsvd_jax.models.layers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsvd_jax._src import partition_rules as partition_rules_lib

Params = dict[str, Any]
# How a parameter starts: the standard deviation of a normal draw, or constant ones / zeros.
Init = float | Literal["ones", "zeros"]

# ----------------------------------------------------------------------------------------------------------------
# Parameter trees
# ----------------------------------------------------------------------------------------------------------------


def is_shape(x: Any) -> bool:
  """Whether ``x`` is a shape tuple (the leaves of a family's ``param_shapes``)."""
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def flatten_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` for every leaf of a nested dict of shapes, in the dict's order."""
  out = {}

  def walk(prefix: str, node: Any):
    if is_shape(node):
      out[prefix] = node
      return
    for k, v in node.items():
      walk(f"{prefix}/{k}" if prefix else k, v)

  walk("", tree)
  return out


def unflatten(flat: Mapping[str, Any]) -> Params:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  out: Params = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def check_params(want: Mapping[str, tuple[int, ...]], params: Mapping[str, Any], *, family: str, hint: str) -> None:
  """Raises ``ValueError`` naming the first parameter path that is missing, unexpected or of the wrong shape.

  Args:
    want: ``{path: shape}`` the config asks for.
    params: the nested dict to check.
    family: the family's name for the messages (``"LLaMA"``).
    hint: the config fields that decide which parameters exist, for the message about unexpected ones.
  """
  from clsvd_jax._src.tree_paths import flatten_with_paths

  have = flatten_with_paths(params)
  for path, shape in want.items():
    if path not in have:
      raise ValueError(f"{family} parameters lack {path!r} (expected shape {shape})")
    if tuple(np.shape(have[path])) != shape:
      raise ValueError(f"{family} parameter {path!r} has shape {tuple(np.shape(have[path]))}, expected {shape}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"{family} parameters hold unexpected entries {extra} for this config ({hint})")


def random_params(shapes: Mapping[str, tuple[int, ...]], init_of: Callable[[str], Init], seed: jax.Array,
                  dtype: Any) -> Params:
  """Random parameters ``{path: array}`` (nested) from one normal draw for all tensors, sliced in ``shapes``' order.

  One draw instead of one per tensor saves seconds of CPU compile time. Every tensor takes its slice, constants
  included, so a model's values depend only on the seed and the layout. Call it under ``jax.jit``.
  """
  sizes = [math.prod(shape) for shape in shapes.values()]
  noise = jax.random.normal(jax.random.key(seed), (sum(sizes),), jnp.float32)
  out = {}
  offset = 0
  for (path, shape), size in zip(shapes.items(), sizes, strict=True):
    init = init_of(path)
    if init == "ones":
      out[path] = jnp.ones(shape, dtype)
    elif init == "zeros":
      out[path] = jnp.zeros(shape, dtype)
    else:
      out[path] = (init * noise[offset:offset + size].reshape(shape)).astype(dtype)
    offset += size
  return unflatten(out)


def update_model(model: nnx.Module, params: Mapping[str, Any], check: Callable[[Mapping[str, Any]], None]) -> None:
  """Writes a params dict into ``model``'s ``nnx.Param`` variables, in place, after ``check(params)``."""
  check(params)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def export(model: Any, to_hf: Callable[[Any, dict[str, Any]], dict[str, np.ndarray]],
           config_to_hf: Callable[[Any], dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(tensors by Hugging Face name, config.json dict with the parameters' dtype)`` of a model."""
  from clsvd_jax._src.tree_paths import flatten_with_paths

  hf_config = config_to_hf(model.config)
  hf_config["dtype"] = jnp.dtype(model.dtype).name
  return to_hf(model.config, flatten_with_paths(model.params())), hf_config


def sum_over_batches(batches: Iterable[Any], statistic: Callable[[int, Any], dict[str, jax.Array]]
                     ) -> dict[str, jax.Array]:
  """``sum_i statistic(i, batch_i)``, key by key (e.g. input covariances over calibration batches)."""
  total: dict[str, jax.Array] = {}
  for i, batch in enumerate(batches):
    part = statistic(i, batch)
    total = part if not total else {k: total[k] + v for k, v in part.items()}
  return total


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tensor names and loading
# ----------------------------------------------------------------------------------------------------------------


class Entry(NamedTuple):
  """One parameter: our path, the Hugging Face names that make it, and whether they are stacked per block."""

  path: str
  hf_names: tuple[str, ...]
  stacked: bool


def host_array(value: Any) -> np.ndarray:
  """A host copy of ``value``, gathered from every process first when it spans several hosts."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils

    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(value)


def to_hf(entries: Iterable[Entry], flat: Mapping[str, Any], *, family: str) -> dict[str, np.ndarray]:
  """``{hf_name: host array}`` from ``{path: array}``: stacked arrays are split per block, dtypes kept."""
  out: dict[str, np.ndarray] = {}
  for entry in entries:
    if entry.path not in flat:
      raise KeyError(f"{family} export: parameter {entry.path!r} is missing from the model")
    host = host_array(flat[entry.path])
    if entry.stacked:
      for i, name in enumerate(entry.hf_names):
        out[name] = np.ascontiguousarray(host[i])
    else:
      out[entry.hf_names[0]] = np.ascontiguousarray(host)
  return out


def from_hf(entries: Iterable[Entry], get: Callable[[str], Any], stack: Callable[[list[Any]], Any] = np.stack
            ) -> dict[str, Any]:
  """``{path: array}`` from a tensor getter ``get(hf_name)`` (tests use it on a torch ``state_dict``)."""
  return {e.path: stack([get(n) for n in e.hf_names]) if e.stacked else get(e.hf_names[0]) for e in entries}


def sharding_for(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh | None,
                 partition_rules: Sequence[tuple[str, Any]] | None) -> jax.sharding.Sharding | None:
  """Where a loaded tensor goes: None without a mesh, else the project's partition rules
  (``clsvd_jax._src.partition_rules``): the first matching regex wins, its spec covers the trailing dims (the
  stacked layer axis stays whole), logical axes map to mesh axes, and a dim its mesh axes do not divide is
  replicated."""
  if mesh is None:
    return None
  rules = partition_rules_lib.DEFAULT_RULES if partition_rules is None else tuple(partition_rules)
  return jax.sharding.NamedSharding(mesh, partition_rules_lib.spec_for(path, shape, mesh, rules))


def load_stacked(reader: Any, entries: Iterable[Entry], shapes: Mapping[str, tuple[int, ...]], *, dtype: Any,
                 mesh: jax.sharding.Mesh | None, partition_rules: Sequence[tuple[str, Any]] | None,
                 rename: Mapping[str, str] | None = None) -> dict[str, jax.Array]:
  """``{path: array}`` read through a ``CheckpointReader``, each array placed by ``sharding_for``.

  Stacked parameters are assembled per device slice straight from the per-block tensors
  (``CheckpointReader.get_stacked``), so no host or device holds more than its own shard plus one copy. ``rename``
  maps a path to the tensor name to read instead of the entry's (a checkpoint's alias of a tensor).
  """
  rename = rename or {}
  flat = {}
  for entry in entries:
    shape = shapes[entry.path]
    sharding = sharding_for(entry.path, shape, mesh, partition_rules)
    if entry.stacked:
      flat[entry.path] = reader.get_stacked(entry.hf_names, dtype=dtype, sharding=sharding, expected_shape=shape[1:])
    else:
      name = rename.get(entry.path, entry.hf_names[0])
      flat[entry.path] = reader.get(name, dtype=dtype, sharding=sharding, expected_shape=shape)
  return flat


# ----------------------------------------------------------------------------------------------------------------
# Config ids and greedy decoding arguments
# ----------------------------------------------------------------------------------------------------------------


def as_id_tuple(value: Any) -> tuple[int, ...]:
  """A config's token id field (None, an int or a list) as a tuple."""
  if value is None:
    return ()
  if isinstance(value, int | bool):
    return (int(value),)
  return tuple(int(v) for v in value)


def eos_array(eos_token_id: int | Sequence[int] | None, default: Sequence[int]) -> jax.Array:
  """End ids as an int32 vector padded with -1 (never a token) to a multiple of 4 entries, so that a different
  number of end ids rarely means a new compilation. All -1: no sequence ends early."""
  if eos_token_id is None:
    ids = tuple(default)
  elif isinstance(eos_token_id, int | np.integer):
    ids = (int(eos_token_id),)
  else:
    ids = tuple(int(e) for e in eos_token_id)
  size = max(4, -(-len(ids) // 4) * 4)
  return jnp.asarray(ids + (-1,) * (size - len(ids)), jnp.int32)


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
  """Which of ``tokens`` ``[B]`` are end ids."""
  return jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1)


def prompt_arrays(input_ids: Any, attention_mask: Any, max_new_tokens: Any) -> tuple[jax.Array, jax.Array]:
  """``(input_ids, attention_mask)`` as int32 ``[B, T]`` arrays (an all-ones mask when None), after checks.

  Raises:
    ValueError: a non-positive or non-integer ``max_new_tokens``, ids that are not ``[B, T]``, a mask of another
      shape.
  """
  if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape {input_ids.shape}")
  return input_ids, attention_mask
