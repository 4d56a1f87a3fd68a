"""LLaMA configuration: the fields of a Hugging Face ``config.json`` that change what the network computes.

Reads both spellings of the rotary settings: transformers v4 (``rope_theta`` and ``rope_scaling`` at the top level,
the scaling kind under ``rope_type`` or the older ``type``) and v5 (one ``rope_parameters`` dict holding
``rope_theta``, ``rope_type`` and the scaling fields). Writes the v5 form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from clsvd_jax.models.common import as_id_tuple
from clsvd_jax.models.layers import ACTIVATIONS  # of the gated MLP (``hidden_act``); the Hugging Face names

# Rotary kinds implemented (``rope_type``): plain, position interpolation, and LLaMA 3.1's frequency-dependent one.
ROPE_TYPES = ("default", "linear", "llama3")

# Keys this module reads or writes itself; everything else of a config.json is carried through ``extra``.
_OWN_KEYS = frozenset({
  "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
  "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
  "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
  "pad_token_id", "model_type", "architectures", "dtype", "torch_dtype", "transformers_version",
})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling (``rope_type`` ``linear`` or ``llama3``).

  Attributes:
    rope_type: ``"linear"`` divides every frequency by ``factor``; ``"llama3"`` divides low frequencies by ``factor``,
      keeps high ones, and interpolates smoothly in between (LLaMA 3.1 / 3.2 / 3.3).
    factor: the scaling factor.
    low_freq_factor: llama3: wavelengths above ``original_max_position_embeddings / low_freq_factor`` are scaled.
    high_freq_factor: llama3: wavelengths below ``original_max_position_embeddings / high_freq_factor`` are kept.
    original_max_position_embeddings: llama3: the pretraining context length.
  """

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA decoder (hashable: it is a static argument of the jitted functions).

  Attributes:
    vocab_size: rows of the token embedding and of the head.
    hidden_size: width of the residual stream D.
    intermediate_size: hidden width F of the gated MLP.
    num_hidden_layers: decoder blocks L.
    num_attention_heads: query heads H.
    num_key_value_heads: key/value heads KV (H a multiple of KV; KV < H is grouped-query attention).
    head_dim: size of one head (LLaMA: D / H; some configs set it explicitly).
    hidden_act: activation of the gate, one of ``ACTIVATIONS``.
    rms_norm_eps: epsilon of the RMS norms.
    rope_theta: rotary base.
    rope_scaling: None or a ``RopeScaling``.
    max_position_embeddings: the context length the config declares (not enforced).
    tie_word_embeddings: the head is the token embedding (no ``lm_head/weight``).
    attention_bias: q/k/v/o projections have biases.
    mlp_bias: gate/up/down projections have biases.
    bos_token_id: begin-of-sequence id (or None).
    eos_token_id: end-of-sequence id, a tuple of them, or None.
    pad_token_id: padding id (or None: generation then pads with the first end id).
    extra: other config.json keys, written back unchanged on export (not part of equality or hash).
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LLaMA config field {name!r} must be a positive integer, got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LLaMA config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LLaMA config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"LLaMA config field 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
    if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES[1:]:
      raise ValueError(f"LLaMA config: rope_type {self.rope_scaling.rope_type!r} is not supported; supported: "
                       f"{', '.join(ROPE_TYPES)}")

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """The end-of-sequence ids as a tuple (empty when the config has none)."""
    return as_id_tuple(self.eos_token_id)


def _rope_fields(d: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, scaling)`` from either the v5 ``rope_parameters`` or the v4 ``rope_theta`` / ``rope_scaling``."""
  params = d.get("rope_parameters")
  if params is not None and not isinstance(params, Mapping):
    raise ValueError(f"{source}: field 'rope_parameters' must be an object, got {params!r}")
  field = "rope_parameters"
  if not params:
    params = d.get("rope_scaling") or {}
    field = "rope_scaling"
    if not isinstance(params, Mapping):
      raise ValueError(f"{source}: field 'rope_scaling' must be an object or null, got {params!r}")
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"{source}: field {field!r} holds per-layer-type rotary settings, which LLaMA does not use")
  theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"{source}: field '{field}.rope_type' is {kind!r}; supported rotary types: "
                     f"{', '.join(ROPE_TYPES)}")
  if kind == "default":
    return float(theta), None
  if "factor" not in params:
    raise ValueError(f"{source}: field '{field}' of rope_type {kind!r} lacks 'factor'")
  if kind == "linear":
    return float(theta), RopeScaling("linear", float(params["factor"]))
  for key in ("low_freq_factor", "high_freq_factor"):
    if key not in params:
      raise ValueError(f"{source}: field '{field}' of rope_type 'llama3' lacks {key!r}")
  original = params.get("original_max_position_embeddings", d.get("max_position_embeddings"))
  if original is None:
    raise ValueError(f"{source}: field '{field}' of rope_type 'llama3' lacks 'original_max_position_embeddings'")
  if float(params["high_freq_factor"]) <= float(params["low_freq_factor"]):
    raise ValueError(f"{source}: field '{field}': high_freq_factor must exceed low_freq_factor")
  return float(theta), RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                   float(params["high_freq_factor"]), int(original))


def config_from_hf(d: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
  """Parses a Hugging Face LLaMA ``config.json`` dict (v4 or v5 layout).

  Args:
    d: the parsed JSON.
    source: what to call the dict in error messages (usually the file's path).

  Raises:
    ValueError: a missing required field, a bad value or an unsupported rotary type, naming ``source`` and the field.
  """
  if d.get("model_type", "llama") != "llama":
    raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, the LLaMA family reads 'llama' configs")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if key not in d:
      raise ValueError(f"{source}: LLaMA config lacks the field {key!r}; add it to config.json")
  heads = int(d["num_attention_heads"])
  kv = d.get("num_key_value_heads")
  head_dim = d.get("head_dim")
  theta, scaling = _rope_fields(d, source)
  eos = d.get("eos_token_id", 2)
  eos = tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else eos
  as_id = lambda v: None if v is None else int(v)
  try:
    return LlamaConfig(
      vocab_size=int(d["vocab_size"]),
      hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]),
      num_hidden_layers=int(d["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=heads if kv is None else int(kv),
      head_dim=int(d["hidden_size"]) // heads if head_dim is None else int(head_dim),
      hidden_act=str(d.get("hidden_act", "silu")),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      attention_bias=bool(d.get("attention_bias", False)),
      mlp_bias=bool(d.get("mlp_bias", False)),
      bos_token_id=as_id(d.get("bos_token_id", 1)),
      eos_token_id=eos,
      pad_token_id=as_id(d.get("pad_token_id")),
      extra={k: v for k, v in d.items() if k not in _OWN_KEYS},
    )
  except (ValueError, TypeError) as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """The ``config.json`` dict (transformers v5 layout) ``LlamaForCausalLM`` loads back to the same network."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    s = config.rope_scaling
    rope = {"rope_type": s.rope_type, "rope_theta": config.rope_theta, "factor": s.factor}
    if s.rope_type == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
  eos = config.eos_token_id
  out = dict(config.extra)
  out.update({
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_size,
    "intermediate_size": config.intermediate_size,
    "num_hidden_layers": config.num_hidden_layers,
    "num_attention_heads": config.num_attention_heads,
    "num_key_value_heads": config.num_key_value_heads,
    "head_dim": config.head_dim,
    "hidden_act": config.hidden_act,
    "rms_norm_eps": config.rms_norm_eps,
    "rope_parameters": rope,
    "max_position_embeddings": config.max_position_embeddings,
    "tie_word_embeddings": config.tie_word_embeddings,
    "attention_bias": config.attention_bias,
    "mlp_bias": config.mlp_bias,
    "bos_token_id": config.bos_token_id,
    "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
    "pad_token_id": config.pad_token_id,
  })
  return out
