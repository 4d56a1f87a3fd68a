"""Models: Hugging Face checkpoints in and out, one Flax NNX family per architecture, a common functional interface.

Public API (each function dispatches to the model's family)::

  model = from_pretrained("path/or/hub-id", dtype=jnp.bfloat16, mesh=None, partition_rules=None)
  logits = model(input_ids, attention_mask)                 # LLaMA; T5: model(ids, decoder_ids, mask, dec_mask)
  new_tokens = generate(model, input_ids, attention_mask, max_new_tokens=20, eos_token_id=None)
  apply_fn, params = functional(model)                      # apply_fn(params, *args) == model(*args), jittable
  update_model(model, params)                               # write params back, in place
  hidden = block_hidden_states(model, *batch)               # {stack: (inputs, outputs)}, each [L, B, T, D]
  shapes = constrained_matrices(model)                      # {path: shape} of attention / MLP matrices
  covs = matrix_input_covariances(model, batches)            # {path: sum x x^T} of every matrix input
  save_pretrained(model, "out/dir", max_shard_size="2GB")   # config.json + safetensors transformers loads
  model = init_from_config({"model_type": "llama", ...}, seed=0)   # random weights, no files

A family is a package ``clsvd_jax.models.<family>`` registered in ``FAMILIES`` by the ``model_type`` values of
``config.json`` it reads. Its ``__init__`` exposes:

* ``MODEL_TYPES``: tuple of ``model_type`` strings it reads (e.g. ``("llama",)``).
* ``Config``: its (frozen, hashable) config dataclass; every model has ``.config``, an instance of it. Dispatch from
  a model to its family goes through ``isinstance(model.config, family.Config)``.
* ``config_from_hf(d: dict, *, source: str = "config.json") -> Config`` (errors name ``source`` and the field) and
  ``config_to_hf(config) -> dict``.
* ``load(reader: CheckpointReader, config, *, dtype, mesh, partition_rules) -> model``: tensors through
  ``reader.get(name, dtype=..., sharding=..., expected_shape=...)``, which names file and tensor in its errors.
  ``partition_rules``: ``(regex over parameter path, spec)`` pairs with ``clsvd_jax.parallel.rules`` semantics (first
  match wins; the spec covers the trailing dims; None uses ``clsvd_jax.parallel.rules.DEFAULT_RULES``).
* ``export(model) -> (tensors: {hf_name: array}, hf_config: dict)``.
* ``init(config, *, seed: int = 0, dtype=jnp.float32) -> model``: random weights.
* ``generate(model, input_ids, attention_mask=None, *, max_new_tokens, eos_token_id=None, pad_token_id=None)``
  -> int32 ``[B, max_new_tokens]`` new tokens, padded with the pad id after a row's end token.
* ``functional(model) -> (apply_fn, params)``, ``update_model(model, params)``,
  ``block_hidden_states(model, ...) -> {stack_prefix: (inputs, outputs)}``, ``constrained_matrices(model)``.

Parameters are nested pure dicts whose "/"-joined paths are the library's contract (see the families' docstrings);
linear weights are ``[out, in]`` (Hugging Face orientation) with layers stacked on axis 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from clsvd_jax.models.checkpoint import CheckpointError, CheckpointReader, MissingTensorError, write_checkpoint
from clsvd_jax.models.hub import HubError, resolve

__all__ = [
  "FAMILIES", "CheckpointError", "CheckpointReader", "HubError", "MissingTensorError", "block_hidden_states",
  "constrained_matrices", "family_of", "family_for_type", "from_pretrained", "functional", "generate",
  "init_from_config", "matrix_input_covariances", "resolve", "save_pretrained", "update_model", "write_checkpoint",
]

# model_type (config.json) -> family package. Families are imported on first use.
FAMILIES: dict[str, str] = {
  "llama": "clsvd_jax.models.llama",
  "t5": "clsvd_jax.models.t5",
}


def family_for_type(model_type: Any, *, source: str = "config.json") -> ModuleType:
  """The family module reading configs of this ``model_type``.

  Raises:
    ValueError: naming ``source`` and the supported types, for an unknown or missing ``model_type``.
  """
  if model_type not in FAMILIES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported model types: "
                     f"{', '.join(sorted(FAMILIES))}")
  return importlib.import_module(FAMILIES[model_type])


def _family_of_config(config: Any) -> ModuleType | None:
  """The family whose ``Config`` class ``config`` is an instance of (its defining package is tried first)."""
  if config is None:
    return None
  home = type(config).__module__
  names = sorted(dict.fromkeys(FAMILIES.values()), key=lambda n: not home.startswith(n + "."))
  for name in names:
    family = importlib.import_module(name)
    if isinstance(config, family.Config):
      return family
  return None


def family_of(model: Any) -> ModuleType:
  """The family module of a model (by the class of ``model.config``)."""
  config = getattr(model, "config", None)
  family = _family_of_config(config)
  if family is not None:
    return family
  raise TypeError(f"{type(model).__name__} is not a clsvd_jax model (its .config is {type(config).__name__}); "
                  f"expected a model of one of the families {sorted(FAMILIES)}")


def from_pretrained(path_or_id: str | Path, *, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    partition_rules: Sequence[tuple[str, Any]] | None = None, revision: str | None = None) -> Any:
  """Loads a model from a Hugging Face checkpoint directory or hub id.

  Args:
    path_or_id: a directory with ``config.json`` and ``model.safetensors`` (or shards + index), or a hub id.
    dtype: parameter dtype; tensors are cast while reading (a bf16 load never holds a float32 host copy).
    mesh: shard parameters over this mesh (each device reads only its slices).
    partition_rules: ``(regex, spec)`` pairs, ``clsvd_jax.parallel.rules`` semantics; None: the default rules.
    revision: hub revision when ``path_or_id`` is a hub id.

  Returns:
    The model; ``model.config`` holds the parsed configuration.

  Raises:
    CheckpointError: missing ``config.json`` / weights, missing or misshaped tensor (naming file and tensor).
    ValueError: unknown ``model_type`` (listing the supported ones) or a bad config field.
    HubError: a hub id that cannot be downloaded (naming the id; pass a local directory instead).
  """
  reader = CheckpointReader(resolve(path_or_id, revision=revision))
  source = str(reader.config_path)
  family = family_for_type(reader.config.get("model_type"), source=source)
  config = family.config_from_hf(reader.config, source=source)
  return family.load(reader, config, dtype=dtype, mesh=mesh, partition_rules=partition_rules)


def save_pretrained(model: Any, path: str | Path, *, max_shard_size: int | str | None = None) -> list[Path]:
  """Writes ``config.json`` and safetensors that transformers' PyTorch ``from_pretrained`` loads.

  Args:
    model: a model of any family.
    path: output directory (created; old weight files there are replaced).
    max_shard_size: None for one ``model.safetensors``; else shards of at most this size (bytes or ``"2GB"``).

  Returns:
    The safetensors files written.
  """
  tensors, hf_config = family_of(model).export(model)
  return write_checkpoint(path, tensors, hf_config, max_shard_size=max_shard_size)


def init_from_config(config: Any, *, seed: int = 0, dtype: Any = jnp.float32) -> Any:
  """A randomly initialised model from a family config or a Hugging Face style config dict (with ``model_type``)."""
  if isinstance(config, Mapping):
    family = family_for_type(config.get("model_type"), source="config")
    config = family.config_from_hf(dict(config), source="config")
  else:
    family = _family_of_config(config)
    if family is None:
      raise TypeError(f"init_from_config: expected a dict with 'model_type' or a family config, got "
                      f"{type(config).__name__}")
  return family.init(config, seed=seed, dtype=dtype)


def generate(model: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> jax.Array:
  """Greedy decoding with a KV cache: int32 new tokens ``[B, max_new_tokens]``, pad id after a row's end token.

  Decoder-only prompts are left-padded (``attention_mask`` 0 on the left); T5 inputs may be padded either side.
  ``eos_token_id`` / ``pad_token_id`` default to the model config's.
  """
  return family_of(model).generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def functional(model: Any) -> tuple[Callable[..., jax.Array], dict[str, Any]]:
  """``(apply_fn, params)``: ``apply_fn(params, *args, **kwargs)`` is pure, jittable and equals ``model(*args)``."""
  return family_of(model).functional(model)


def update_model(model: Any, params: Mapping[str, Any]) -> None:
  """Writes a params dict (the layout ``functional`` returns) back into the model, in place."""
  family_of(model).update_model(model, params)


def block_hidden_states(model: Any, *args: Any, **kwargs: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{stack_prefix: (inputs, outputs)}``, each ``[L, B, T, D]``: every block's input and output hidden states.

  Arguments are the model's call arguments (LLaMA: ``input_ids, attention_mask=None``; T5: ``input_ids,
  decoder_input_ids, attention_mask=None, decoder_attention_mask=None``).
  """
  return family_of(model).block_hidden_states(model, *args, **kwargs)


def constrained_matrices(model: Any) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the attention and MLP matrices (stacked ``[L, out, in]``)."""
  return family_of(model).constrained_matrices(model)


def matrix_input_covariances(model: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
  """``{path: [L, in, in]}``: sums of ``x x^T`` over the real tokens of ``batches`` of the input of every matrix
  ``constrained_matrices`` lists (the ``activations`` basis source, docs/design.md §4b).

  Batches are dicts of the model's call arguments by name (LLaMA: ``input_ids``, ``attention_mask``; T5 also
  ``decoder_input_ids``, ``decoder_attention_mask``); masks mark real tokens.
  """
  return family_of(model).matrix_input_covariances(model, batches)
