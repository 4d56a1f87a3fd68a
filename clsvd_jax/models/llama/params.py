"""Hugging Face LLaMA checkpoint names <-> this library's stacked parameter paths.

Hugging Face stores one tensor per block (``model.layers.3.self_attn.q_proj.weight``); we store one array per kind
with the blocks on a leading axis (``layers/self_attn/q_proj/weight`` [L, out, in]). Linear weights keep their
[out, in] orientation, so the map is renaming plus stacking; norms' ``weight`` becomes ``scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from clsvd_jax.models import common
from clsvd_jax.models.common import Entry
from clsvd_jax.models.llama.config import LlamaConfig


def _layer_entries(config: LlamaConfig) -> Iterator[Entry]:
  def per_layer(suffix: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.{suffix}" for i in range(config.num_hidden_layers))

  yield Entry("layers/input_layernorm/scale", per_layer("input_layernorm.weight"), True)
  for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
    yield Entry(f"layers/self_attn/{m}/weight", per_layer(f"self_attn.{m}.weight"), True)
    if config.attention_bias:
      yield Entry(f"layers/self_attn/{m}/bias", per_layer(f"self_attn.{m}.bias"), True)
  yield Entry("layers/post_attention_layernorm/scale", per_layer("post_attention_layernorm.weight"), True)
  for m in ("gate_proj", "up_proj", "down_proj"):
    yield Entry(f"layers/mlp/{m}/weight", per_layer(f"mlp.{m}.weight"), True)
    if config.mlp_bias:
      yield Entry(f"layers/mlp/{m}/bias", per_layer(f"mlp.{m}.bias"), True)


def key_map(config: LlamaConfig) -> list[Entry]:
  """Every parameter of a model with this config and the checkpoint tensors it is made of."""
  entries = [Entry("embed_tokens/embedding", ("model.embed_tokens.weight",), False)]
  entries += list(_layer_entries(config))
  entries.append(Entry("norm/scale", ("model.norm.weight",), False))
  if not config.tie_word_embeddings:
    entries.append(Entry("lm_head/weight", ("lm_head.weight",), False))
  return entries


def from_hf(config: LlamaConfig, get: Callable[[str], Any], stack: Callable[[list[Any]], Any] = np.stack
            ) -> dict[str, Any]:
  """``{path: array}`` from a tensor getter ``get(hf_name)`` (used by tests on a torch ``state_dict``)."""
  return common.from_hf(key_map(config), get, stack)


def to_hf(config: LlamaConfig, flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{hf_name: host array}`` from ``{path: array}`` (stacked arrays are split per block)."""
  return common.to_hf(key_map(config), flat, family="LLaMA")
