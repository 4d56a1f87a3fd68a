"""Hugging Face LLaMA checkpoint names <-> this library's stacked parameter paths.

Hugging Face stores one tensor per block (``model.layers.3.self_attn.q_proj.weight``); we store one array per kind
with the blocks on a leading axis (``layers/self_attn/q_proj/weight`` [L, out, in]). Linear weights keep their
[out, in] orientation, so the map is renaming plus stacking; norms' ``weight`` becomes ``scale``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from clsvd_jax.models.llama.config import LlamaConfig


class Entry(NamedTuple):
  """One parameter: our path, the Hugging Face names that make it, and whether they are stacked per block."""

  path: str
  hf_names: tuple[str, ...]
  stacked: bool


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


def to_hf(config: LlamaConfig, flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{hf_name: host array}`` from ``{path: array}`` (stacked arrays are split per block)."""
  out: dict[str, np.ndarray] = {}
  for entry in key_map(config):
    value = flat[entry.path]
    if entry.stacked:
      host = _host(value)
      for i, name in enumerate(entry.hf_names):
        out[name] = np.ascontiguousarray(host[i])
    else:
      out[entry.hf_names[0]] = np.ascontiguousarray(_host(value))
  return out


def _host(value: Any) -> np.ndarray:
  import jax

  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils

    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(value)
