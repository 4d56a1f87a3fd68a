"""Hugging Face T5 checkpoint names <-> this library's stacked parameter paths.

Hugging Face stores one tensor per block (``encoder.block.3.layer.0.SelfAttention.q.weight``); we store one array
per kind with the blocks on a leading axis (``encoder/layers/self_attn/q/weight`` [L, out, in]). Linear weights
keep their [out, in] orientation, so the map is pure renaming plus stacking. In a decoder block ``layer.0`` is
self-attention, ``layer.1`` cross-attention and ``layer.2`` the feed forward; in an encoder block the feed forward is
``layer.1``. Only the first block of a stack holds the relative position bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from clsvd_jax.models import common
from clsvd_jax.models.common import Entry
from clsvd_jax.models.common import unflatten as unflatten  # tests and the family build params with it
from clsvd_jax.models.t5.config import T5Config

_ATTN_HF = {"self_attn": "SelfAttention", "cross_attn": "EncDecAttention"}


def _stack_entries(config: T5Config, stack: str) -> Iterator[Entry]:
  num_layers = config.num_layers if stack == "encoder" else config.num_decoder_layers
  decoder = stack == "decoder"
  ff_index = 2 if decoder else 1
  mlp_names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")

  def per_layer(fmt: str) -> tuple[str, ...]:
    return tuple(f"{stack}.block.{i}.{fmt}" for i in range(num_layers))

  attns = [("self_attn", 0)] + ([("cross_attn", 1)] if decoder else [])
  for ours, index in attns:
    for m in ("q", "k", "v", "o"):
      yield Entry(f"{stack}/layers/{ours}/{m}/weight", per_layer(f"layer.{index}.{_ATTN_HF[ours]}.{m}.weight"), True)
    yield Entry(f"{stack}/layers/{ours}_norm/scale", per_layer(f"layer.{index}.layer_norm.weight"), True)
  for m in mlp_names:
    yield Entry(f"{stack}/layers/mlp/{m}/weight", per_layer(f"layer.{ff_index}.DenseReluDense.{m}.weight"), True)
  yield Entry(f"{stack}/layers/mlp_norm/scale", per_layer(f"layer.{ff_index}.layer_norm.weight"), True)
  yield Entry(f"{stack}/relative_attention_bias/embedding",
              (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), False)
  yield Entry(f"{stack}/final_norm/scale", (f"{stack}.final_layer_norm.weight",), False)


def key_map(config: T5Config) -> list[Entry]:
  """Every parameter of a model with this config and the checkpoint tensors it is made of."""
  entries = [Entry("shared/embedding", ("shared.weight",), False)]
  entries += list(_stack_entries(config, "encoder"))
  entries += list(_stack_entries(config, "decoder"))
  if not config.tie_word_embeddings:
    entries.append(Entry("lm_head/weight", ("lm_head.weight",), False))
  return entries


# Older checkpoints may hold the embedding only under the stacks' names.
SHARED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def to_hf(config: T5Config, flat_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Unstacks ``{path: array}`` into ``{hf_name: np.ndarray}`` (host copies, dtype kept)."""
  return common.to_hf(key_map(config), flat_params, family="T5")


def from_hf(config: T5Config, get: Callable[[str], Any], stack: Callable[[list[Any]], Any] = np.stack
            ) -> dict[str, Any]:
  """Builds ``{path: array}`` from a tensor getter ``get(hf_name)`` (used by tests on a torch ``state_dict``)."""
  return common.from_hf(key_map(config), get, stack)
