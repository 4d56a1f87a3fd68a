"""T5 encoder-decoder in Flax NNX, computing what transformers' PyTorch ``T5ForConditionalGeneration`` computes.

The NNX modules only hold parameters; the network itself is a set of pure functions of a nested dict of arrays.
``encoder_block`` and ``decoder_block`` are written once: ``forward`` (``model(...)``, the runner's functional
interface), the block hidden states, the input covariances (their ``taps``) and greedy decoding (the decoder block's
``KVCache``) all run them through ``clsvd_jax.models.layers.scan_blocks``. Layers are stacked on a leading axis
and run with ``jax.lax.scan``: one compiled block per stack whatever the depth, and every matrix of a kind is one
[L, out, in] array for the batched SVD of the subspace code.

What parity with the reference depends on:
* the relative position bias is computed once per stack (by the first block in the reference) and added to the
  self-attention logits of every block; buckets are bidirectional in the encoder and causal in the decoder, and
  cross-attention has no position bias;
* attention logits are not scaled by ``1 / sqrt(d_kv)`` (the scale is folded into the initialisation of ``q``);
* the layer norm is RMS-style: no mean subtraction, no bias, variance accumulated in float32;
* v1.0 multiplies the decoder output by ``d_model ** -0.5`` before the (tied) head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clsvd_jax.models import common, layers
from clsvd_jax.models.common import Params
from clsvd_jax.models.layers import Embed, KVCache, Linear, RMSNorm, Taps, activation, block_io, linear, scan_blocks
from clsvd_jax.models.t5.config import T5Config

# ----------------------------------------------------------------------------------------------------------------
# Parameter containers (NNX). Attribute names are the parameter paths of the library's contract.
# ----------------------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
  """Projections of one attention block (``q``, ``k``, ``v``: [.., H*d_kv, D]; ``o``: [.., D, H*d_kv])."""

  def __init__(self, p: Mapping[str, Any]):
    self.q = Linear(p["q"])
    self.k = Linear(p["k"])
    self.v = Linear(p["v"])
    self.o = Linear(p["o"])


class FeedForward(nnx.Module):
  """``wi`` + ``wo`` (ReLU, v1.0) or ``wi_0`` (activated) * ``wi_1`` + ``wo`` (gated, v1.1 / flan)."""

  def __init__(self, p: Mapping[str, Any]):
    for name in ("wi", "wi_0", "wi_1"):
      if name in p:
        setattr(self, name, Linear(p[name]))
    self.wo = Linear(p["wo"])


class Blocks(nnx.Module):
  """All blocks of one stack, every parameter stacked on a leading layer axis."""

  def __init__(self, p: Mapping[str, Any]):
    self.self_attn = Attention(p["self_attn"])
    self.self_attn_norm = RMSNorm(p["self_attn_norm"])
    if "cross_attn" in p:
      self.cross_attn = Attention(p["cross_attn"])
      self.cross_attn_norm = RMSNorm(p["cross_attn_norm"])
    self.mlp = FeedForward(p["mlp"])
    self.mlp_norm = RMSNorm(p["mlp_norm"])


class Stack(nnx.Module):
  """Encoder or decoder: stacked blocks, the shared relative position bias and the final norm."""

  def __init__(self, p: Mapping[str, Any]):
    self.layers = Blocks(p["layers"])
    self.relative_attention_bias = Embed(p["relative_attention_bias"])
    self.final_norm = RMSNorm(p["final_norm"])


class T5Model(nnx.Module):
  """T5 for conditional generation.

  Call as ``model(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)`` -> float32
  logits ``[batch, decoder_length, vocab]``. Masks are 1 for real tokens and 0 for padding (either side works for
  the encoder; the decoder is causal on top of its mask). ``model.config`` is the ``T5Config``.

  Build one with ``clsvd_jax.models.t5.init`` (random), ``clsvd_jax.models.from_pretrained`` (a checkpoint), or
  directly from a nested dict of arrays laid out as ``param_shapes(config)``.
  """

  def __init__(self, config: T5Config, params: Mapping[str, Any]):
    check_params(config, params)
    self.config = config
    self.shared = Embed(params["shared"])
    self.encoder = Stack(params["encoder"])
    self.decoder = Stack(params["decoder"])
    if not config.tie_word_embeddings:
      self.lm_head = Linear(params["lm_head"])

  @property
  def dtype(self) -> jnp.dtype:
    """The parameters' dtype (that of the shared embedding)."""
    return self.shared.embedding.get_value().dtype

  def params(self) -> Params:
    """The parameters as a nested dict of arrays (the functional view; no copy)."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array, attention_mask: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None) -> jax.Array:
    return forward_jit(self.params(), input_ids, decoder_input_ids, attention_mask, decoder_attention_mask,
                       config=self.config)


# ----------------------------------------------------------------------------------------------------------------
# Shapes and random initialisation
# ----------------------------------------------------------------------------------------------------------------


def _stack_shapes(config: T5Config, num_layers: int, cross: bool) -> Params:
  d, f, inner, n = config.d_model, config.d_ff, config.inner_dim, num_layers
  attn = lambda: {"q": {"weight": (n, inner, d)}, "k": {"weight": (n, inner, d)}, "v": {"weight": (n, inner, d)},
                  "o": {"weight": (n, d, inner)}}
  if config.is_gated_act:
    mlp = {"wi_0": {"weight": (n, f, d)}, "wi_1": {"weight": (n, f, d)}, "wo": {"weight": (n, d, f)}}
  else:
    mlp = {"wi": {"weight": (n, f, d)}, "wo": {"weight": (n, d, f)}}
  layers: Params = {"self_attn": attn(), "self_attn_norm": {"scale": (n, d)}}
  if cross:
    layers["cross_attn"] = attn()
    layers["cross_attn_norm"] = {"scale": (n, d)}
  layers["mlp"] = mlp
  layers["mlp_norm"] = {"scale": (n, d)}
  return {"layers": layers,
          "relative_attention_bias": {"embedding": (config.relative_attention_num_buckets, config.num_heads)},
          "final_norm": {"scale": (d,)}}


def param_shapes(config: T5Config) -> Params:
  """The nested dict of parameter shapes a model of this config has (the layout of ``T5Model.params()``)."""
  shapes: Params = {
    "shared": {"embedding": (config.vocab_size, config.d_model)},
    "encoder": _stack_shapes(config, config.num_layers, cross=False),
    "decoder": _stack_shapes(config, config.num_decoder_layers, cross=True),
  }
  if not config.tie_word_embeddings:
    shapes["lm_head"] = {"weight": (config.vocab_size, config.d_model)}
  return shapes


def flat_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` for every parameter of this config."""
  return common.flatten_shapes(param_shapes(config))


def check_params(config: T5Config, params: Mapping[str, Any]) -> None:
  """Raises ``ValueError`` naming the first parameter path that is missing, unexpected or of the wrong shape."""
  common.check_params(flat_shapes(config), params, family="T5",
                      hint=f"tie_word_embeddings={config.tie_word_embeddings}, is_gated_act={config.is_gated_act}")


def _init_std(config: T5Config, path: str) -> common.Init:
  """How a parameter of T5 starts: a normal draw with a fan-in based scale; norms at one."""
  d, f, inner = config.d_model, config.d_ff, config.inner_dim
  if path.endswith("/scale"):
    return "ones"
  if path in ("shared/embedding", "lm_head/weight"):
    return 1.0
  if path.endswith("relative_attention_bias/embedding"):
    return d**-0.5
  name = path.split("/")[-2]
  # q absorbs the 1/sqrt(d_kv) the attention logits do not get.
  return {"q": (d * config.d_kv) ** -0.5, "k": d**-0.5, "v": d**-0.5, "o": inner**-0.5, "wi": d**-0.5,
          "wi_0": d**-0.5, "wi_1": d**-0.5, "wo": f**-0.5}[name]


def init_params(config: T5Config, *, seed: int = 0, dtype: Any = jnp.float32) -> Params:
  """Random parameters with T5's initialisation (normal with fan-in based scales, norms at one)."""
  return _init_params(config, jnp.asarray(seed, jnp.uint32), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _init_params(config: T5Config, seed: jax.Array, dtype: Any) -> Params:
  return common.random_params(flat_shapes(config), functools.partial(_init_std, config), seed, dtype)


# ----------------------------------------------------------------------------------------------------------------
# The network as pure functions
# ----------------------------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """Bucket of each relative position ``key_pos - query_pos`` (Mesh TensorFlow's scheme, as T5 was trained).

  Half of a direction's buckets hold exact small distances, the other half logarithmically wider ranges up to
  ``max_distance``; farther distances share the last bucket. The float32 logarithm and truncation match the
  reference bit for bit (a rounding difference would move a boundary distance into the neighbouring bucket).
  """
  rel = relative_position.astype(jnp.int32)
  buckets = jnp.zeros_like(rel)
  n = num_buckets
  if bidirectional:
    n //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * n
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = n // 2
  is_small = rel < max_exact
  # maximum(rel, 1) keeps log finite where the small branch is taken anyway.
  scaled = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (scaled * (n - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, n - 1)
  return buckets + jnp.where(is_small, rel, large)


def position_bias(table: jax.Array, query_positions: jax.Array, key_length: int, *, bidirectional: bool,
                  config: T5Config) -> jax.Array:
  """Relative position bias ``[1, H, Tq, Tk]`` from the ``[num_buckets, H]`` table."""
  rel = jnp.arange(key_length)[None, :] - query_positions[:, None]
  bucket = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=config.relative_attention_num_buckets,
                                    max_distance=config.relative_attention_max_distance)
  return jnp.transpose(table[bucket], (2, 0, 1))[None]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """T5 layer norm: ``scale * x / rms(x)``, no centring, no bias; like the reference, the normalised values take the
  scale's dtype before the multiply (a no-op in float32)."""
  return layers.rms_norm(x, scale, eps, normed_dtype=scale.dtype)


def _heads(x: jax.Array, config: T5Config) -> jax.Array:
  return x.reshape(*x.shape[:-1], config.num_heads, config.d_kv)


def _feed_forward(p: Params, x: jax.Array, config: T5Config, taps: Taps = None) -> jax.Array:
  if config.is_gated_act:
    h = activation(config.dense_act_fn, linear(x, p["wi_0"])) * linear(x, p["wi_1"])
  else:
    h = activation(config.dense_act_fn, linear(x, p["wi"]))
  h = h.astype(p["wo"]["weight"].dtype)
  if taps is not None:
    taps.update({name: x for name in p if name != "wo"}, wo=h)
  return linear(h, p["wo"])


def _attention(p: Params, x: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array | None,
               mask: jax.Array | None, config: T5Config, taps: Taps = None) -> jax.Array:
  """Unscaled attention of ``x``'s queries over ``keys``/``values`` (T5 folds the scale into ``q``'s init)."""
  heads = layers.attend(_heads(linear(x, p["q"]), config), keys, values, mask, bias=bias)
  if taps is not None:
    taps.update(q=x, o=heads)
  return linear(heads, p["o"])


def kv(p: Params, x: jax.Array, config: T5Config) -> tuple[jax.Array, jax.Array]:
  """Keys and values ``[B, S, H, d_kv]`` of one attention block's parameters ``p`` over states ``x``."""
  return _heads(linear(x, p["k"]), config), _heads(linear(x, p["v"]), config)


def _prefixed(taps: dict[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
  return {f"{prefix}/{k}": v for k, v in taps.items()}


def encoder_block(p: Params, h: jax.Array, *, bias: jax.Array, mask: jax.Array | None, config: T5Config,
                  cache: None = None, layer: jax.Array | None = None, taps: Taps = None) -> tuple[jax.Array, None]:
  """One encoder block. With ``taps`` (a dict), records the input of every matrix under ``"self_attn/q"``, ...
  (``k``/``v`` share ``q``'s input and are not repeated; see ``input_covariances``). ``cache`` and ``layer`` are
  the ``scan_blocks`` protocol (the encoder has no cache)."""
  del cache, layer
  eps = config.layer_norm_epsilon
  attn_taps, mlp_taps = ({}, {}) if taps is not None else (None, None)
  x = rms_norm(h, p["self_attn_norm"]["scale"], eps)
  h = h + _attention(p["self_attn"], x, *kv(p["self_attn"], x, config), bias, mask, config, attn_taps)
  h = h + _feed_forward(p["mlp"], rms_norm(h, p["mlp_norm"]["scale"], eps), config, mlp_taps)
  if taps is not None:
    taps.update(_prefixed(attn_taps, "self_attn") | _prefixed(mlp_taps, "mlp"))
  return h, None


def decoder_block(p: Params, h: jax.Array, *, bias: jax.Array, self_mask: jax.Array,
                  cross: tuple[jax.Array, jax.Array], cross_mask: jax.Array | None, config: T5Config,
                  cache: KVCache | None = None, layer: jax.Array | None = None,
                  taps: Taps = None) -> tuple[jax.Array, KVCache | None]:
  """One decoder block: causal self-attention, cross-attention, feed forward.

  Args:
    p: one layer's parameters.
    h: decoder states ``[B, T, D]``.
    bias: the self-attention position bias ``[1, H, T, S]``.
    self_mask: boolean ``[B|1, T, S]`` over self-attention keys.
    cross: this block's cross-attention keys and values ``[B, S_enc, H, d_kv]`` (``kv`` of the encoder output).
    cross_mask: boolean ``[B, 1, S_enc]`` over encoder tokens, or None.
    config: the config.
    cache: with a ``KVCache``, the self-attention keys and values go to the cache's slot and attention reads all its
      slots (cached decoding); without one, the call's own.
    layer: this block's index (to address the cache).
    taps: as in ``encoder_block``; the cross-attention ``k``/``v`` input (the encoder output) is not recorded.
  """
  eps = config.layer_norm_epsilon
  self_taps, cross_taps, mlp_taps = ({}, {}, {}) if taps is not None else (None, None, None)
  x = rms_norm(h, p["self_attn_norm"]["scale"], eps)
  k, v = kv(p["self_attn"], x, config)
  if cache is not None:
    cache, k, v = cache.write(layer, k, v)
  h = h + _attention(p["self_attn"], x, k, v, bias, self_mask, config, self_taps)
  x = rms_norm(h, p["cross_attn_norm"]["scale"], eps)
  h = h + _attention(p["cross_attn"], x, *cross, None, cross_mask, config, cross_taps)
  h = h + _feed_forward(p["mlp"], rms_norm(h, p["mlp_norm"]["scale"], eps), config, mlp_taps)
  if taps is not None:
    taps.update(_prefixed(self_taps, "self_attn") | _prefixed(cross_taps, "cross_attn") | _prefixed(mlp_taps, "mlp"))
  return h, cache


def key_mask(mask: jax.Array | None) -> jax.Array | None:
  """[B, T] padding mask -> boolean [B, 1, T] over keys."""
  return None if mask is None else mask.astype(bool)[:, None, :]


def _encoder_setup(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None, config: T5Config):
  length = input_ids.shape[1]
  bias = position_bias(params["encoder"]["relative_attention_bias"]["embedding"], jnp.arange(length), length,
                       bidirectional=True, config=config)
  block = functools.partial(encoder_block, bias=bias, mask=key_mask(attention_mask), config=config)
  return params["shared"]["embedding"][input_ids], block


def _decoder_setup(params: Params, decoder_input_ids: jax.Array, decoder_attention_mask: jax.Array | None,
                   encoder_states: jax.Array, attention_mask: jax.Array | None, config: T5Config):
  length = decoder_input_ids.shape[1]
  bias = position_bias(params["decoder"]["relative_attention_bias"]["embedding"], jnp.arange(length), length,
                       bidirectional=False, config=config)
  causal = jnp.tril(jnp.ones((length, length), bool))[None]
  self_mask = causal if decoder_attention_mask is None else causal & key_mask(decoder_attention_mask)

  def block(p, h, **kw):
    # The cross-attention keys and values of this block, from the encoder output.
    return decoder_block(p, h, bias=bias, self_mask=self_mask, cross=kv(p["cross_attn"], encoder_states, config),
                         cross_mask=key_mask(attention_mask), config=config, **kw)

  return params["shared"]["embedding"][decoder_input_ids], block


def encode(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, config: T5Config,
           collect: bool = False) -> tuple[jax.Array, Any]:
  """Encoder: returns the final hidden states ``[B, S, D]`` and, with ``collect``, per-block (inputs, outputs)."""
  x, block = _encoder_setup(params, input_ids, attention_mask, config)
  x, _, states = scan_blocks(block, params["encoder"]["layers"], x, observe=block_io if collect else None)
  return rms_norm(x, params["encoder"]["final_norm"]["scale"], config.layer_norm_epsilon), states


def decode(params: Params, decoder_input_ids: jax.Array, encoder_states: jax.Array,
           attention_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None, *,
           config: T5Config, collect: bool = False) -> tuple[jax.Array, Any]:
  """Decoder over a whole target sequence (teacher forcing): final hidden states ``[B, T, D]`` (+ block states)."""
  x, block = _decoder_setup(params, decoder_input_ids, decoder_attention_mask, encoder_states, attention_mask, config)
  x, _, states = scan_blocks(block, params["decoder"]["layers"], x, observe=block_io if collect else None)
  return rms_norm(x, params["decoder"]["final_norm"]["scale"], config.layer_norm_epsilon), states


def lm_logits(params: Params, hidden: jax.Array, config: T5Config) -> jax.Array:
  """Float32 logits from final decoder states (v1.0: scaled by ``d_model ** -0.5`` first)."""
  if config.scale_decoder_outputs:
    hidden = hidden * (config.d_model**-0.5)
  head = params["shared"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["weight"]
  return layers.head_logits(hidden, head)


def forward(params: Params, input_ids: jax.Array, decoder_input_ids: jax.Array,
            attention_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None, *,
            config: T5Config) -> jax.Array:
  """Logits ``[B, T_dec, vocab]`` (float32): the pure function behind ``T5Model.__call__``."""
  enc, _ = encode(params, input_ids, attention_mask, config=config)
  dec, _ = decode(params, decoder_input_ids, enc, attention_mask, decoder_attention_mask, config=config)
  return lm_logits(params, dec, config)


forward_jit = jax.jit(forward, static_argnames=("config",))


@functools.partial(jax.jit, static_argnames=("config",))
def block_states(params: Params, input_ids: jax.Array, decoder_input_ids: jax.Array,
                 attention_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None, *,
                 config: T5Config) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Input and output hidden states of every block, ``{"encoder/layers": (in, out), "decoder/layers": ...}``.

  Each array is ``[L, B, T, D]``; block ``l``'s output is block ``l + 1``'s input.
  """
  enc, enc_states = encode(params, input_ids, attention_mask, config=config, collect=True)
  _, dec_states = decode(params, decoder_input_ids, enc, attention_mask, decoder_attention_mask, config=config,
                         collect=True)
  return {"encoder/layers": enc_states, "decoder/layers": dec_states}


@functools.partial(jax.jit, static_argnames=("config",))
def input_covariances(params: Params, input_ids: jax.Array, decoder_input_ids: jax.Array,
                      attention_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None, *,
                      config: T5Config) -> dict[str, jax.Array]:
  """``{matrix path: [L, in, in]}``: sum of ``x x^T`` over the real tokens of every constrained matrix's input.

  The statistic of the ``activations`` basis source (docs/design.md §4b): the blocks' ``taps``, reduced inside the
  scans.
  Matrices sharing an input share its covariance (q/k/v; ``wi_0``/``wi_1``); the decoder's cross-attention ``k``/``v``
  read the encoder output, whose covariance is summed over the encoder's real tokens.
  """
  enc_tokens = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
  dec_tokens = (jnp.ones(decoder_input_ids.shape, jnp.int32) if decoder_attention_mask is None
                else decoder_attention_mask)
  x, block = _encoder_setup(params, input_ids, attention_mask, config)
  x, _, enc_covs = scan_blocks(block, params["encoder"]["layers"], x, observe=layers.tap_covariances(enc_tokens))
  enc = rms_norm(x, params["encoder"]["final_norm"]["scale"], config.layer_norm_epsilon)
  x, block = _decoder_setup(params, decoder_input_ids, decoder_attention_mask, enc, attention_mask, config)
  _, _, dec_covs = scan_blocks(block, params["decoder"]["layers"], x, observe=layers.tap_covariances(dec_tokens))
  out = {}
  for stack, covs in (("encoder", enc_covs), ("decoder", dec_covs)):
    for name, c in covs.items():
      out[f"{stack}/layers/{name}/weight"] = c
    out[f"{stack}/layers/self_attn/k/weight"] = out[f"{stack}/layers/self_attn/v/weight"] = covs["self_attn/q"]
  enc_cov = layers.covariance(enc, enc_tokens)
  out["decoder/layers/cross_attn/k/weight"] = out["decoder/layers/cross_attn/v/weight"] = jnp.broadcast_to(
    enc_cov, (config.num_decoder_layers, *enc_cov.shape))
  return out


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing: ``[start, labels[:-1]]`` with ignored labels (-100) turned into padding."""
  labels = jnp.asarray(labels)
  start = jnp.full((*labels.shape[:-1], 1), decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)
