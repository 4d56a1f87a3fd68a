"""T5 configuration: the fields of a Hugging Face ``config.json`` that change what the network computes.

Two flags describe the output head, because transformers v5 split what v4 expressed with one:

* ``tie_word_embeddings``: the head reuses ``shared/embedding`` (no ``lm_head/weight`` parameter).
* ``scale_decoder_outputs``: the decoder output is multiplied by ``d_model ** -0.5`` before the head (T5 v1.0).

T5 v1.0 is tied and scaled; v1.1 / flan is untied and unscaled. A v4 config only has ``tie_word_embeddings`` and
means both; a v5 config always says ``tie_word_embeddings: true`` and adds ``scale_decoder_outputs``, while the real
tying then depends on whether the checkpoint holds an ``lm_head.weight`` that differs from ``shared.weight`` (the
loader decides that, see ``clsvd_jax.models.t5.load``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from clsvd_jax.models.common import as_id_tuple
from clsvd_jax.models.layers import ACTIVATIONS  # T5 checkpoints' ``dense_act_fn``; the Hugging Face names

# Keys this module reads or writes itself; everything else of a config.json is carried through ``extra``.
_OWN_KEYS = frozenset({
  "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
  "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj", "is_gated_act",
  "dense_act_fn", "layer_norm_epsilon", "tie_word_embeddings", "scale_decoder_outputs", "pad_token_id",
  "eos_token_id", "decoder_start_token_id", "dropout_rate", "model_type", "architectures", "is_encoder_decoder",
  "dtype", "torch_dtype", "transformers_version",
})


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder-decoder (hashable: it is a static argument of the jitted functions).

  Attributes:
    vocab_size: rows of the shared embedding (and of the head).
    d_model: width of the residual stream.
    d_kv: size of one attention head.
    d_ff: hidden width of the feed-forward block.
    num_layers: encoder blocks.
    num_decoder_layers: decoder blocks.
    num_heads: attention heads (``inner = num_heads * d_kv``).
    relative_attention_num_buckets: buckets of the relative position bias.
    relative_attention_max_distance: distance from which all positions share the last bucket.
    feed_forward_proj: ``"relu"`` (v1.0), ``"gated-gelu"`` (v1.1 / flan) or ``"[gated-]<act>"``.
    is_gated_act: gated feed forward (``wi_0``, ``wi_1``, ``wo``) instead of ``wi``, ``wo``.
    dense_act_fn: activation name, one of ``ACTIVATIONS``.
    layer_norm_epsilon: epsilon of the RMS layer norm.
    tie_word_embeddings: the head is ``shared/embedding`` (no ``lm_head/weight``).
    scale_decoder_outputs: multiply the decoder output by ``d_model ** -0.5`` before the head.
    pad_token_id: padding id (also the default decoder start id).
    eos_token_id: end-of-sequence id, or a tuple of them.
    decoder_start_token_id: first decoder input of generation.
    dropout_rate: kept for the exported config only; the model applies no dropout.
    extra: other config.json keys, written back unchanged on export (not part of equality or hash).
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  is_gated_act: bool = False
  dense_act_fn: str = "relu"
  layer_norm_epsilon: float = 1e-6
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool = True
  pad_token_id: int = 0
  eos_token_id: int | tuple[int, ...] | None = 1
  decoder_start_token_id: int = 0
  dropout_rate: float = 0.1
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"T5 config field {name!r} must be a positive integer, got {value!r}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5 config field 'relative_attention_num_buckets' must be at least 4 (half exact, half "
                       f"logarithmic buckets per direction), got {self.relative_attention_num_buckets}")
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"T5 config field 'dense_act_fn' (from 'feed_forward_proj'={self.feed_forward_proj!r}) is "
                       f"{self.dense_act_fn!r}; supported activations: {', '.join(ACTIVATIONS)}")

  @property
  def inner_dim(self) -> int:
    """Width of the concatenated attention heads."""
    return self.num_heads * self.d_kv

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """The end-of-sequence ids as a tuple (empty when the config has none)."""
    return as_id_tuple(self.eos_token_id)


def _parse_feed_forward_proj(value: str, source: str) -> tuple[bool, str]:
  parts = value.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"{source}: field 'feed_forward_proj' is {value!r}; expected '<act>' or 'gated-<act>', e.g. "
                     "'relu' (T5 v1.0) or 'gated-gelu' (T5 v1.1 / flan-t5)")
  gated = len(parts) == 2
  act = parts[-1]
  # Hugging Face maps "gated-gelu" to the tanh approximation, which is what the v1.1 checkpoints were trained with.
  if value == "gated-gelu":
    act = "gelu_new"
  return gated, act


def config_from_hf(d: Mapping[str, Any], *, source: str = "config.json") -> T5Config:
  """Parses a Hugging Face T5 ``config.json`` dict.

  Args:
    d: the parsed JSON.
    source: what to call the dict in error messages (usually the file's path).

  Returns:
    The config. ``tie_word_embeddings`` follows the file; the loader unties it when the checkpoint holds a distinct
    ``lm_head.weight`` (transformers v5 saves untied T5 models with ``tie_word_embeddings: true``).

  Raises:
    ValueError: on a missing required field or an unsupported activation, naming ``source`` and the field.
  """
  if d.get("model_type", "t5") != "t5":
    raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, the T5 family reads 't5' configs")
  for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
    if key not in d:
      raise ValueError(f"{source}: T5 config lacks the field {key!r}; add it to config.json")
  ff = d.get("feed_forward_proj", "relu")
  gated, act = _parse_feed_forward_proj(ff, source)
  # An explicit dense_act_fn overrides the derived one (transformers does the same when it reloads its configs).
  act = d.get("dense_act_fn") or act
  gated = bool(d.get("is_gated_act", gated))
  if act not in ACTIVATIONS:
    raise ValueError(f"{source}: activation {act!r} (fields 'feed_forward_proj'/'dense_act_fn') is not supported; "
                     f"supported: {', '.join(ACTIVATIONS)}")
  tie = d.get("tie_word_embeddings", True)
  tie = True if tie is None else bool(tie)
  scale = d.get("scale_decoder_outputs")
  # v4 configs have no scale_decoder_outputs: there tie_word_embeddings=False meant "unscaled" as well.
  scale = tie if scale is None else bool(scale)
  eos = d.get("eos_token_id", 1)
  eos = tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else eos
  pad = d.get("pad_token_id", 0)
  pad = 0 if pad is None else int(pad)
  start = d.get("decoder_start_token_id")
  start = pad if start is None else int(start)
  try:
    return T5Config(
      vocab_size=int(d["vocab_size"]),
      d_model=int(d["d_model"]),
      d_kv=int(d["d_kv"]),
      d_ff=int(d["d_ff"]),
      num_layers=int(d["num_layers"]),
      num_decoder_layers=int(d.get("num_decoder_layers") or d["num_layers"]),
      num_heads=int(d["num_heads"]),
      relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
      feed_forward_proj=ff,
      is_gated_act=gated,
      dense_act_fn=act,
      layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
      tie_word_embeddings=tie,
      scale_decoder_outputs=scale,
      pad_token_id=pad,
      eos_token_id=eos,
      decoder_start_token_id=start,
      dropout_rate=float(d.get("dropout_rate", 0.1)),
      extra={k: v for k, v in d.items() if k not in _OWN_KEYS},
    )
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: T5Config) -> dict[str, Any]:
  """The ``config.json`` dict transformers' ``T5ForConditionalGeneration`` loads back to the same network.

  Both head flags are written: ``scale_decoder_outputs`` for transformers v5, ``tie_word_embeddings`` for v4 and
  for readers of the file (an untied export also writes ``lm_head.weight``, which v5 then keeps untied).
  """
  out = dict(config.extra)
  eos = config.eos_token_id
  out.update({
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "is_encoder_decoder": True,
    "vocab_size": config.vocab_size,
    "d_model": config.d_model,
    "d_kv": config.d_kv,
    "d_ff": config.d_ff,
    "num_layers": config.num_layers,
    "num_decoder_layers": config.num_decoder_layers,
    "num_heads": config.num_heads,
    "relative_attention_num_buckets": config.relative_attention_num_buckets,
    "relative_attention_max_distance": config.relative_attention_max_distance,
    "feed_forward_proj": config.feed_forward_proj,
    "is_gated_act": config.is_gated_act,
    "dense_act_fn": config.dense_act_fn,
    "layer_norm_epsilon": config.layer_norm_epsilon,
    "tie_word_embeddings": config.tie_word_embeddings,
    "scale_decoder_outputs": config.scale_decoder_outputs,
    "pad_token_id": config.pad_token_id,
    "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
    "decoder_start_token_id": config.decoder_start_token_id,
    "dropout_rate": config.dropout_rate,
  })
  return out
