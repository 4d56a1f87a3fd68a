"""T5 family (v1.0, v1.1, flan-t5): the family module ``clsvd_jax.models`` dispatches to for ``model_type: t5``.

Parameter paths (nested dict keys joined by "/"; layers stacked on axis 0):
``shared/embedding`` [V, D]; ``{encoder,decoder}/layers/self_attn/{q,k,v,o}/weight``;
``{encoder,decoder}/layers/{self_attn_norm,mlp_norm}/scale`` [L, D]; ``.../layers/mlp/{wi | wi_0, wi_1}/weight``
[L, F, D] and ``.../layers/mlp/wo/weight`` [L, D, F]; ``decoder/layers/cross_attn/{q,k,v,o}/weight`` and
``decoder/layers/cross_attn_norm/scale``; ``{encoder,decoder}/relative_attention_bias/embedding`` [buckets, H];
``{encoder,decoder}/final_norm/scale`` [D]; ``lm_head/weight`` [V, D] only when untied.
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
from clsvd_jax.models.checkpoint import MissingTensorError
from clsvd_jax.models.t5 import model as model_lib
from clsvd_jax.models.t5 import params as t5_params
from clsvd_jax.models.t5.config import T5Config, config_from_hf, config_to_hf
from clsvd_jax.models.t5.generate import generate
from clsvd_jax.models.t5.model import (
  T5Model,
  block_states,
  check_params,
  flat_shapes,
  forward,
  init_params,
  param_shapes,
  shift_right,
)

MODEL_TYPES = ("t5",)
Config = T5Config

__all__ = [
  "MODEL_TYPES", "Config", "T5Config", "T5Model", "config_from_hf", "config_to_hf", "load", "export", "init",
  "generate", "functional", "update_model", "block_hidden_states", "constrained_matrices", "shift_right",
  "matrix_input_covariances",
  "param_shapes",
]

# Matrices the orthogonal-complement update constrains: attention projections and feed-forward weights.
_CONSTRAINED = re.compile(r"/layers/(self_attn|cross_attn)/(q|k|v|o)/weight$|/layers/mlp/(wi|wi_0|wi_1|wo)/weight$")


def init(config: T5Config, *, seed: int = 0, dtype: Any = jnp.float32) -> T5Model:
  """A randomly initialised model (T5's initialisation scales)."""
  return T5Model(config, init_params(config, seed=seed, dtype=dtype))


def _reader_source(reader: Any) -> str:
  path = getattr(reader, "path", None)
  return str(path) if path is not None else "checkpoint"


def _untie_if_distinct(reader: Any, config: T5Config, keys: set[str]) -> T5Config:
  """transformers v5 writes ``tie_word_embeddings: true`` for every T5 and keeps a distinct ``lm_head.weight``
  untied; v4-era files may also hold a copy of the embedding under that name. Follow what the tensors say."""
  if config.tie_word_embeddings and "lm_head.weight" in keys:
    head = reader.numpy("lm_head.weight")
    shared = reader.numpy(_shared_name(reader, keys))
    if head.shape != shared.shape or not np.array_equal(head, shared):
      return dataclasses.replace(config, tie_word_embeddings=False)
  if not config.tie_word_embeddings and "lm_head.weight" not in keys:
    # transformers v5 ties the head in this case too; do the same so both compute the same logits.
    warnings.warn(f"{_reader_source(reader)}/config.json says tie_word_embeddings=false but the checkpoint has no "
                  "'lm_head.weight'; using the shared embedding as the head (as transformers does)", stacklevel=3)
    return dataclasses.replace(config, tie_word_embeddings=True)
  return config


def _shared_name(reader: Any, keys: set[str]) -> str:
  for name in t5_params.SHARED_ALIASES:
    if name in keys:
      return name
  raise MissingTensorError(f"{_reader_source(reader)}: tensor 'shared.weight' (the token embedding) is missing from "
                           "the checkpoint; a T5 checkpoint needs it (or 'encoder.embed_tokens.weight')")


def load(reader: Any, config: T5Config, *, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
         partition_rules: Sequence[tuple[str, Any]] | None = None) -> T5Model:
  """Builds a model from a Hugging Face T5 checkpoint.

  Stacked parameters are assembled per device slice straight from the per-block tensors of the files
  (``CheckpointReader.get_stacked``), so no host or device holds more than its own shard plus one copy.

  Args:
    reader: a ``clsvd_jax.models.checkpoint.CheckpointReader`` over the checkpoint directory.
    config: the parsed config (``config_from_hf(reader.config)``).
    dtype: parameter dtype (e.g. ``jnp.bfloat16``); tensors are cast while reading.
    mesh: optional mesh to shard parameters on.
    partition_rules: ``(regex over parameter path, spec)`` pairs as in ``clsvd_jax.parallel.rules`` (first match
      wins; the spec names the trailing dims, e.g. ``(r"self_attn/q/weight$", ("tensor", "fsdp"))``); None uses
      ``clsvd_jax.parallel.rules.DEFAULT_RULES``.

  Raises:
    CheckpointError / MissingTensorError: from the reader, naming the file and tensor (missing, misshaped).
  """
  keys = set(reader.keys())
  config = _untie_if_distinct(reader, config, keys)
  flat = common.load_stacked(reader, t5_params.key_map(config), flat_shapes(config), dtype=dtype, mesh=mesh,
                             partition_rules=partition_rules,
                             rename={"shared/embedding": _shared_name(reader, keys)})
  return T5Model(config, t5_params.unflatten(flat))


def export(model: T5Model) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(tensors by Hugging Face name, config.json dict)`` that transformers' ``T5ForConditionalGeneration`` loads."""
  return common.export(model, t5_params.to_hf, config_to_hf)


def functional(model: T5Model) -> tuple[Callable[..., jax.Array], dict[str, Any]]:
  """``(apply_fn, params)``: ``apply_fn(params, input_ids, decoder_input_ids, attention_mask=None,
  decoder_attention_mask=None)`` is pure, jittable, and equals ``model(...)``."""
  return functools.partial(forward, config=model.config), model.params()


def update_model(model: T5Model, params: dict[str, Any]) -> None:
  """Writes a params dict (as returned by ``functional``) back into the model, in place.

  Raises:
    ValueError: naming the path of a missing, unexpected or misshaped parameter.
  """
  common.update_model(model, params, functools.partial(check_params, model.config))


def block_hidden_states(model: T5Model, input_ids: Any, decoder_input_ids: Any, attention_mask: Any = None,
                        decoder_attention_mask: Any = None) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Inputs and outputs of every block: ``{"encoder/layers": (in, out), "decoder/layers": (in, out)}``.

  Arrays are ``[L, B, T, D]`` (T the encoder or decoder length); used for block importance (cosine between a
  block's input and output over real tokens).
  """
  as_ids = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return block_states(model.params(), as_ids(input_ids), as_ids(decoder_input_ids), as_ids(attention_mask),
                      as_ids(decoder_attention_mask), config=model.config)


def constrained_matrices(model: T5Model) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the attention (self and cross) and feed-forward matrices, stacked ``[L, out, in]``."""
  return {p: s for p, s in flat_shapes(model.config).items() if _CONSTRAINED.search(p)}


def matrix_input_covariances(model: T5Model, batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
  """``{path: [L, in, in]}``: sums of ``x x^T`` over the real tokens of ``batches`` of the input of every
  constrained matrix (basis source ``activations``, docs/design.md §4b).

  Args:
    model: a ``T5Model``.
    batches: dicts with ``input_ids`` and ``decoder_input_ids`` and optionally ``attention_mask`` and
      ``decoder_attention_mask`` (1 for real tokens).
  """
  as_ids = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  params = model.params()

  def covariances(i: int, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    missing = [k for k in ("input_ids", "decoder_input_ids") if k not in batch]
    if missing:
      raise ValueError(f"T5 covariance batch {i} lacks {missing}; it needs input_ids and decoder_input_ids "
                       "(attention masks optional)")
    return model_lib.input_covariances(params, as_ids(batch["input_ids"]), as_ids(batch["decoder_input_ids"]),
                                       as_ids(batch.get("attention_mask")),
                                       as_ids(batch.get("decoder_attention_mask")), config=model.config)

  return common.sum_over_batches(batches, covariances)
