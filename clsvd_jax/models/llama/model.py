"""LLaMA decoder in Flax NNX, computing what transformers' PyTorch ``LlamaForCausalLM`` computes.

The NNX modules only hold parameters; the network is a set of pure functions of a nested dict of arrays. One
``block`` function is the decoder block: ``forward`` (``model(...)``, the runner's functional interface), the block
hidden states, the input covariances (its ``taps``) and greedy decoding (its ``KVCache``) all run it through
``run_blocks``. Layers are stacked on a leading axis and run with ``jax.lax.scan``: one compiled block whatever the
depth, and every matrix of a kind is one ``[L, out, in]`` array for the batched SVD of the subspace code.

What parity with the reference depends on:
* rotary embeddings rotate the two halves of each head (``rotate_half``), not interleaved pairs; the angles are
  ``position * inv_freq`` in float32, cast to the activation dtype before use; llama3 scaling reshapes ``inv_freq``;
* RMSNorm computes in float32 and casts back to the input dtype before the scale multiply;
* grouped-query attention: query head ``h`` reads key/value head ``h // (H / KV)``;
* padded batches: the padding mask removes pad keys and positions count real tokens only
  (``cumsum(mask) - 1``, as transformers' ``generate`` sets them for left-padded prompts).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsvd_jax.models import common
from clsvd_jax.models.common import Params
from clsvd_jax.models.common import unflatten as unflatten  # the family API and tests use it from here
from clsvd_jax.models.layers import (
  Embed,
  KVCache,
  Linear,
  RMSNorm,
  Taps,
  activation,
  attend,
  block_io,
  head_logits,
  linear,
  rms_norm,
  scan_blocks,
  tap_covariances,
)
from clsvd_jax.models.llama.config import LlamaConfig

# ----------------------------------------------------------------------------------------------------------------
# Parameter containers (NNX). Attribute names are the parameter paths of the library's contract.
# ----------------------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
  """``q_proj`` [.., H*hd, D], ``k_proj`` / ``v_proj`` [.., KV*hd, D], ``o_proj`` [.., D, H*hd]."""

  def __init__(self, p: Mapping[str, Any]):
    self.q_proj = Linear(p["q_proj"])
    self.k_proj = Linear(p["k_proj"])
    self.v_proj = Linear(p["v_proj"])
    self.o_proj = Linear(p["o_proj"])


class MLP(nnx.Module):
  """SwiGLU: ``down(act(gate(x)) * up(x))``."""

  def __init__(self, p: Mapping[str, Any]):
    self.gate_proj = Linear(p["gate_proj"])
    self.up_proj = Linear(p["up_proj"])
    self.down_proj = Linear(p["down_proj"])


class Layers(nnx.Module):
  """All decoder blocks, every parameter stacked on a leading layer axis."""

  def __init__(self, p: Mapping[str, Any]):
    self.input_layernorm = RMSNorm(p["input_layernorm"])
    self.self_attn = Attention(p["self_attn"])
    self.post_attention_layernorm = RMSNorm(p["post_attention_layernorm"])
    self.mlp = MLP(p["mlp"])


class LlamaModel(nnx.Module):
  """LLaMA causal language model.

  Call as ``model(input_ids, attention_mask=None, position_ids=None)`` -> float32 logits ``[batch, length, vocab]``.
  ``attention_mask`` is 1 for real tokens and 0 for padding (left padding for prompts; right padding works too);
  positions default to ``cumsum(attention_mask) - 1``. ``model.config`` is the ``LlamaConfig``.

  Build one with ``clsvd_jax.models.llama.init`` (random), ``clsvd_jax.models.from_pretrained`` (a checkpoint), or
  directly from a nested dict of arrays laid out as ``param_shapes(config)``.
  """

  def __init__(self, config: LlamaConfig, params: Mapping[str, Any]):
    check_params(config, params)
    self.config = config
    self.embed_tokens = Embed(params["embed_tokens"])
    self.layers = Layers(params["layers"])
    self.norm = RMSNorm(params["norm"])
    if not config.tie_word_embeddings:
      self.lm_head = Linear(params["lm_head"])

  @property
  def dtype(self) -> jnp.dtype:
    """The parameters' dtype (that of the token embedding)."""
    return self.embed_tokens.embedding.get_value().dtype

  def params(self) -> Params:
    """The parameters as a nested dict of arrays (the functional view; no copy)."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    return forward_jit(self.params(), input_ids, attention_mask, position_ids, config=self.config)


# ----------------------------------------------------------------------------------------------------------------
# Shapes and random initialisation
# ----------------------------------------------------------------------------------------------------------------


def param_shapes(config: LlamaConfig) -> Params:
  """The nested dict of parameter shapes a model of this config has (the layout of ``LlamaModel.params()``)."""
  n, d, f = config.num_hidden_layers, config.hidden_size, config.intermediate_size
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim

  def lin(out: int, inp: int, bias: bool) -> Params:
    p: Params = {"weight": (n, out, inp)}
    if bias:
      p["bias"] = (n, out)
    return p

  ab, mb = config.attention_bias, config.mlp_bias
  shapes: Params = {
    "embed_tokens": {"embedding": (config.vocab_size, d)},
    "layers": {
      "input_layernorm": {"scale": (n, d)},
      "self_attn": {"q_proj": lin(q_out, d, ab), "k_proj": lin(kv_out, d, ab), "v_proj": lin(kv_out, d, ab),
                    "o_proj": lin(d, q_out, ab)},
      "post_attention_layernorm": {"scale": (n, d)},
      "mlp": {"gate_proj": lin(f, d, mb), "up_proj": lin(f, d, mb), "down_proj": lin(d, f, mb)},
    },
    "norm": {"scale": (d,)},
  }
  if not config.tie_word_embeddings:
    shapes["lm_head"] = {"weight": (config.vocab_size, d)}
  return shapes


def flat_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` for every parameter of this config."""
  return common.flatten_shapes(param_shapes(config))


def check_params(config: LlamaConfig, params: Mapping[str, Any]) -> None:
  """Raises ``ValueError`` naming the first parameter path that is missing, unexpected or of the wrong shape."""
  common.check_params(flat_shapes(config), params, family="LLaMA",
                      hint=f"tie_word_embeddings={config.tie_word_embeddings}, attention_bias={config.attention_bias}, "
                           f"mlp_bias={config.mlp_bias}")


def init_params(config: LlamaConfig, *, seed: int = 0, dtype: Any = jnp.float32) -> Params:
  """Random parameters as transformers initialises LLaMA: weights and embeddings ``N(0, initializer_range)``
  (``config.extra``, default 0.02), biases zero, norm scales one."""
  std = float(config.extra.get("initializer_range", 0.02))
  return _init_params(config, jnp.asarray(seed, jnp.uint32), jnp.dtype(dtype), std)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "std"))
def _init_params(config: LlamaConfig, seed: jax.Array, dtype: Any, std: float) -> Params:
  def init_of(path: str) -> common.Init:
    return "ones" if path.endswith("/scale") else "zeros" if path.endswith("/bias") else std

  return common.random_params(flat_shapes(config), init_of, seed, dtype)


# ----------------------------------------------------------------------------------------------------------------
# The network as pure functions
# ----------------------------------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies ``[head_dim / 2]`` (float32), with the config's frequency scaling applied."""
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv
  factor = np.float32(s.factor)
  if s.rope_type == "linear":
    return (inv / factor).astype(np.float32)
  # llama3: long wavelengths (low frequencies) are slowed down by ``factor``, short ones kept, the band between
  # interpolated linearly in ``original_context / wavelength``.
  old = np.float32(s.original_max_position_embeddings)
  low, high = np.float32(s.low_freq_factor), np.float32(s.high_freq_factor)
  low_wavelen, high_wavelen = old / low, old / high
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, config: LlamaConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` ``[B, T, head_dim]`` for integer positions ``[B, T]``, in ``dtype``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[B, T, heads, hd]``: ``x * cos + rotate_half(x) * sin`` with ``rotate_half = [-x2, x1]``."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def qkv(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
        config: LlamaConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rotated queries ``[B, T, H, hd]``, rotated keys and values ``[B, T, KV, hd]`` of normed inputs ``x``."""
  hd = config.head_dim
  q = linear(x, p["q_proj"]).reshape(*x.shape[:-1], config.num_attention_heads, hd)
  k = linear(x, p["k_proj"]).reshape(*x.shape[:-1], config.num_key_value_heads, hd)
  v = linear(x, p["v_proj"]).reshape(*x.shape[:-1], config.num_key_value_heads, hd)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class BlockInputs(NamedTuple):
  """What every block of one call reads besides its parameters and hidden states.

  Attributes:
    cos, sin: rotary tables ``[B, T, head_dim]`` of the tokens' positions, in the activation dtype.
    mask: boolean ``[B, T, S]``: which keys each query sees (``S = T``, or the cache's length when decoding).
  """

  cos: jax.Array
  sin: jax.Array
  mask: jax.Array


def block_inputs(positions: jax.Array, mask: jax.Array, config: LlamaConfig, dtype: Any) -> BlockInputs:
  """``BlockInputs`` for integer ``positions`` ``[B, T]`` and a key mask ``[B, T, S]``."""
  return BlockInputs(*rope_tables(positions, config, dtype), mask)


def block(p: Params, h: jax.Array, inputs: BlockInputs, config: LlamaConfig, *, cache: KVCache | None = None,
          layer: jax.Array | None = None, taps: Taps = None) -> tuple[jax.Array, KVCache | None]:
  """One decoder block: pre-norm attention and pre-norm SwiGLU feed forward, each with a residual.

  Args:
    p: one layer's parameters (``params["layers"]`` sliced at ``layer``).
    h: hidden states ``[B, T, D]`` entering the block.
    inputs: rotary tables and key mask of this call.
    config: the config.
    cache: with a ``KVCache``, the block writes its keys and values at the cache's slot and attends over all of the
      cache's slots (prefill and decoding); without one, over this call's own keys.
    layer: this block's index in the stack (to address the cache).
    taps: a dict to record the input of every matrix in: ``self_attn/q_proj`` (shared by ``k_proj``/``v_proj``),
      ``self_attn/o_proj``, ``mlp/gate_proj`` (shared by ``up_proj``) and ``mlp/down_proj``.

  Returns:
    ``(hidden states leaving the block, cache)``.
  """
  eps = config.rms_norm_eps
  attn, mlp = p["self_attn"], p["mlp"]
  x = rms_norm(h, p["input_layernorm"]["scale"], eps)
  q, k, v = qkv(attn, x, inputs.cos, inputs.sin, config)
  if cache is not None:
    cache, k, v = cache.write(layer, k, v)
  heads = attend(q, k, v, inputs.mask, scale=config.head_dim**-0.5)
  h = h + linear(heads, attn["o_proj"])
  y = rms_norm(h, p["post_attention_layernorm"]["scale"], eps)
  hidden = activation(config.hidden_act, linear(y, mlp["gate_proj"])) * linear(y, mlp["up_proj"])
  if taps is not None:
    taps.update({"self_attn/q_proj": x, "self_attn/o_proj": heads, "mlp/gate_proj": y, "mlp/down_proj": hidden})
  return h + linear(hidden, mlp["down_proj"]), cache


def run_blocks(params: Params, h: jax.Array, inputs: BlockInputs, config: LlamaConfig, *,
               cache: KVCache | None = None, observe: Callable[..., Any] | None = None
               ) -> tuple[jax.Array, KVCache | None, Any]:
  """Every block over ``h`` (``clsvd_jax.models.layers.scan_blocks``): ``(h, cache, stacked observations)``."""
  fn = functools.partial(block, inputs=inputs, config=config)
  return scan_blocks(fn, params["layers"], h, cache=cache, observe=observe)


def default_positions(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
  """Positions counting real tokens only, ``cumsum(mask) - 1`` (0 on pads), or ``arange(T)`` without a mask."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
  mask = attention_mask.astype(jnp.int32)
  return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)


def causal_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
  """Boolean ``[B, T, T]``: query ``t`` sees keys ``s <= t`` that are not padding."""
  t = input_ids.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, :]
  return mask


def embed_prompt(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None,
                 position_ids: jax.Array | None, config: LlamaConfig) -> tuple[jax.Array, BlockInputs]:
  """Token embeddings ``[B, T, D]`` and the ``BlockInputs`` of a whole (padded) sequence, causal over itself."""
  x = params["embed_tokens"]["embedding"][input_ids]
  if position_ids is None:
    position_ids = default_positions(input_ids, attention_mask)
  return x, block_inputs(position_ids, causal_mask(input_ids, attention_mask), config, x.dtype)


def final_norm(params: Params, h: jax.Array, config: LlamaConfig) -> jax.Array:
  """The norm after the last block."""
  return rms_norm(h, params["norm"]["scale"], config.rms_norm_eps)


def lm_logits(params: Params, hidden: jax.Array, config: LlamaConfig) -> jax.Array:
  """Float32 logits from final normed hidden states."""
  head = params["embed_tokens"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["weight"]
  return head_logits(hidden, head)


def forward(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            position_ids: jax.Array | None = None, *, config: LlamaConfig) -> jax.Array:
  """Logits ``[B, T, vocab]`` (float32): the pure function behind ``LlamaModel.__call__``."""
  x, inputs = embed_prompt(params, input_ids, attention_mask, position_ids, config)
  h, _, _ = run_blocks(params, x, inputs, config)
  return lm_logits(params, final_norm(params, h, config), config)


forward_jit = jax.jit(forward, static_argnames=("config",))


@functools.partial(jax.jit, static_argnames=("config",))
def block_states(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *,
                 config: LlamaConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{"layers": (inputs, outputs)}``, each ``[L, B, T, D]``; block ``l``'s output is block ``l + 1``'s input."""
  x, inputs = embed_prompt(params, input_ids, attention_mask, position_ids, config)
  _, _, states = run_blocks(params, x, inputs, config, observe=block_io)
  return {"layers": states}


# Matrices reading the same input as a tapped one share its covariance.
_SHARED_INPUT = {"self_attn/k_proj": "self_attn/q_proj", "self_attn/v_proj": "self_attn/q_proj",
                 "mlp/up_proj": "mlp/gate_proj"}


@functools.partial(jax.jit, static_argnames=("config",))
def input_covariances(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      config: LlamaConfig) -> dict[str, jax.Array]:
  """``{matrix path: [L, in, in]}``: the sum of ``x x^T`` over real tokens of every constrained matrix's input.

  The block's ``taps``, reduced inside the scan (no ``[L, B, T, F]`` activations are kept); q/k/v and gate/up share
  their input (the normed block input), so they share a covariance.
  """
  tokens = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
  x, inputs = embed_prompt(params, input_ids, attention_mask, None, config)
  _, _, covs = run_blocks(params, x, inputs, config, observe=tap_covariances(tokens))
  covs |= {name: covs[source] for name, source in _SHARED_INPUT.items()}
  return {f"layers/{name}/weight": c for name, c in covs.items()}
