"""LLaMA family (1, 2, 3, 3.1-style configs): the family module ``clsvd_jax.models`` dispatches to for ``llama``.

Parameter paths (nested dict keys joined by "/"; layers stacked on axis 0, linear weights ``[out, in]``):
``embed_tokens/embedding`` [V, D]; ``layers/input_layernorm/scale`` [L, D];
``layers/self_attn/{q,k,v,o}_proj/weight`` ([L, H*hd, D], [L, KV*hd, D], [L, KV*hd, D], [L, D, H*hd]) and
``.../bias`` [L, out] with ``attention_bias``; ``layers/post_attention_layernorm/scale`` [L, D];
``layers/mlp/{gate,up}_proj/weight`` [L, F, D], ``layers/mlp/down_proj/weight`` [L, D, F] (+ bias with
``mlp_bias``); ``norm/scale`` [D]; ``lm_head/weight`` [V, D] only when untied.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax.models import common
from clsvd_jax.models.llama import params as llama_params
from clsvd_jax.models.llama.config import LlamaConfig, RopeScaling, config_from_hf, config_to_hf
from clsvd_jax.models.llama.generate import generate
from clsvd_jax.models.llama.model import (
  LlamaModel,
  block_states,
  check_params,
  flat_shapes,
  forward,
  init_params,
  input_covariances,
  param_shapes,
  unflatten,
)

MODEL_TYPES = ("llama",)
Config = LlamaConfig

__all__ = [
  "MODEL_TYPES", "Config", "LlamaConfig", "LlamaModel", "RopeScaling", "config_from_hf", "config_to_hf", "load",
  "export", "init", "generate", "functional", "update_model", "block_hidden_states", "constrained_matrices",
  "matrix_input_covariances", "param_shapes",
]

# Matrices the orthogonal-complement update constrains: attention projections and the MLP.
_CONSTRAINED = re.compile(r"^layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/weight$")


def init(config: LlamaConfig, *, seed: int = 0, dtype: Any = jnp.float32) -> LlamaModel:
  """A randomly initialised model (transformers' LLaMA initialisation)."""
  return LlamaModel(config, init_params(config, seed=seed, dtype=dtype))


def _resolve_head(reader: Any, config: LlamaConfig) -> LlamaConfig:
  """A tied config whose checkpoint holds a distinct ``lm_head.weight`` is loaded untied, as transformers does."""
  if config.tie_word_embeddings and "lm_head.weight" in reader:
    head = reader.numpy("lm_head.weight")
    embed = reader.numpy("model.embed_tokens.weight")
    if head.shape != embed.shape or not np.array_equal(head, embed):
      warnings.warn(f"{reader.config_path}: tie_word_embeddings is true but the checkpoint holds a distinct "
                    "'lm_head.weight'; loading it untied (as transformers does)", stacklevel=3)
      return dataclasses.replace(config, tie_word_embeddings=False)
  return config


def load(reader: Any, config: LlamaConfig, *, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
         partition_rules: Sequence[tuple[str, Any]] | None = None) -> LlamaModel:
  """Builds a model from a Hugging Face LLaMA checkpoint.

  Stacked parameters are assembled per device slice straight from the per-block tensors of the files
  (``CheckpointReader.get_stacked``), so no host or device ever holds more than its own shard plus one copy.

  Args:
    reader: a ``clsvd_jax.models.checkpoint.CheckpointReader`` over the checkpoint directory.
    config: the parsed config (``config_from_hf(reader.config)``).
    dtype: parameter dtype (e.g. ``jnp.bfloat16``); tensors are cast slice by slice while reading.
    mesh: optional mesh to shard parameters on.
    partition_rules: ``(regex over parameter path, trailing-dims spec)`` pairs as in ``clsvd_jax.parallel.rules``
      (first match wins), e.g. ``(r"mlp/up_proj/weight$", ("tensor", "fsdp"))``; None uses
      ``clsvd_jax.parallel.rules.DEFAULT_RULES``.

  Raises:
    CheckpointError / MissingTensorError: from the reader, naming the file and tensor.
  """
  config = _resolve_head(reader, config)
  flat = common.load_stacked(reader, llama_params.key_map(config), flat_shapes(config), dtype=dtype, mesh=mesh,
                             partition_rules=partition_rules)
  return LlamaModel(config, unflatten(flat))


def export(model: LlamaModel) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(tensors by Hugging Face name, config.json dict)`` that transformers' ``LlamaForCausalLM`` loads."""
  return common.export(model, llama_params.to_hf, config_to_hf)


def functional(model: LlamaModel) -> tuple[Callable[..., jax.Array], dict[str, Any]]:
  """``(apply_fn, params)``: ``apply_fn(params, input_ids, attention_mask=None, position_ids=None)`` is pure,
  jittable, and equals ``model(...)``."""
  return functools.partial(forward, config=model.config), model.params()


def update_model(model: LlamaModel, params: Mapping[str, Any]) -> None:
  """Writes a params dict (as returned by ``functional``) back into the model, in place.

  Raises:
    ValueError: naming the path of a missing, unexpected or misshaped parameter.
  """
  common.update_model(model, params, functools.partial(check_params, model.config))


def _ids(x: Any) -> jax.Array | None:
  return None if x is None else jnp.asarray(x, jnp.int32)


def block_hidden_states(model: LlamaModel, input_ids: Any, attention_mask: Any = None,
                        position_ids: Any = None) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Inputs and outputs of every block, ``{"layers": (inputs, outputs)}``, each ``[L, B, T, D]``.

  Used for block importance (cosine between a block's input and output over real tokens).
  """
  return block_states(model.params(), _ids(input_ids), _ids(attention_mask), _ids(position_ids),
                      config=model.config)


def constrained_matrices(model: LlamaModel) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the attention and MLP matrices, stacked ``[L, out, in]``."""
  return {p: s for p, s in flat_shapes(model.config).items() if _CONSTRAINED.search(p)}


def matrix_input_covariances(model: LlamaModel, batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
  """``{path: [L, in, in]}``: sums of ``x x^T`` over the real tokens of ``batches`` (dicts with ``input_ids`` and
  optionally ``attention_mask``) of the input of every constrained matrix (basis source ``activations``)."""
  params = model.params()

  def covariances(i: int, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    if "input_ids" not in batch:
      raise ValueError(f"LLaMA covariance batch {i} lacks 'input_ids' (attention_mask optional)")
    return input_covariances(params, _ids(batch["input_ids"]), _ids(batch.get("attention_mask")), config=model.config)

  return common.sum_over_batches(batches, covariances)
