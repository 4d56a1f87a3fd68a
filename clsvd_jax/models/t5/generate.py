"""Greedy decoding for T5 with a decoder self-attention KV cache and precomputed cross-attention keys/values.

One jitted function per (config, batch shape, ``max_new_tokens``): the encoder runs once, every decoder block's
cross-attention keys and values are computed once, and a ``jax.lax.while_loop`` feeds one token per step through
the stacked decoder blocks, writing each block's new key/value into a fixed-size cache. Shapes never change inside
the loop, so nothing recompiles per step, and the loop ends as soon as every sequence has produced an end token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax.models.t5 import model as t5_model
from clsvd_jax.models.t5.config import T5Config


def _eos_array(eos_token_id: int | Sequence[int] | None, config: T5Config) -> jax.Array:
  if eos_token_id is None:
    ids = config.eos_token_ids
  elif isinstance(eos_token_id, int | np.integer):
    ids = (int(eos_token_id),)
  else:
    ids = tuple(int(e) for e in eos_token_id)
  return jnp.asarray(ids, jnp.int32).reshape(-1)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def greedy(params: t5_model.Params, input_ids: jax.Array, attention_mask: jax.Array, eos_ids: jax.Array,
           pad_id: jax.Array, start_id: jax.Array, *, config: T5Config, max_new_tokens: int) -> jax.Array:
  """The jitted decode loop behind ``generate`` (arguments already normalised to arrays)."""
  batch = input_ids.shape[0]
  n = max_new_tokens
  eps = config.layer_norm_epsilon
  enc, _ = t5_model.encode(params, input_ids, attention_mask, config=config)
  dec = params["decoder"]
  layers = dec["layers"]
  heads = lambda x: x.reshape(*x.shape[:-1], config.num_heads, config.d_kv)
  # [L, B, S, H, dk]: cross-attention keys/values of every block, computed once.
  cross_k = heads(jnp.einsum("bsd,lod->lbso", enc, layers["cross_attn"]["k"]["weight"]))
  cross_v = heads(jnp.einsum("bsd,lod->lbso", enc, layers["cross_attn"]["v"]["weight"]))
  cross_mask = attention_mask.astype(bool)[:, None, None, :]
  num_layers = config.num_decoder_layers
  dtype = enc.dtype
  cache_k = jnp.zeros((num_layers, batch, n, config.num_heads, config.d_kv), dtype)
  cache_v = jnp.zeros_like(cache_k)
  table = dec["relative_attention_bias"]["embedding"]
  key_positions = jnp.arange(n)

  def step(carry):
    t, token, cache_k, cache_v, done, out = carry
    x = params["shared"]["embedding"][token][:, None, :]
    bias = t5_model.position_bias(table, t[None], n, bidirectional=False, config=config)
    self_mask = (key_positions <= t)[None, None, None, :]

    def block(h, xs):
      p, ck, cv, xk, xv = xs
      sa = p["self_attn"]
      normed = t5_model.rms_norm(h, p["self_attn_norm"]["scale"], eps)
      q = heads(t5_model.linear(normed, sa["q"]["weight"]))
      ck = jax.lax.dynamic_update_slice_in_dim(ck, heads(t5_model.linear(normed, sa["k"]["weight"])), t, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, heads(t5_model.linear(normed, sa["v"]["weight"])), t, axis=1)
      h = h + t5_model.linear(t5_model.attend(q, ck, cv, bias, self_mask), sa["o"]["weight"])
      ca = p["cross_attn"]
      normed = t5_model.rms_norm(h, p["cross_attn_norm"]["scale"], eps)
      q = heads(t5_model.linear(normed, ca["q"]["weight"]))
      h = h + t5_model.linear(t5_model.attend(q, xk, xv, None, cross_mask), ca["o"]["weight"])
      h = h + t5_model._feed_forward(p["mlp"], t5_model.rms_norm(h, p["mlp_norm"]["scale"], eps), config)
      return h, (ck, cv)

    h, (cache_k, cache_v) = jax.lax.scan(block, x, (layers, cache_k, cache_v, cross_k, cross_v))
    h = t5_model.rms_norm(h, dec["final_norm"]["scale"], eps)
    logits = t5_model.lm_logits(params, h[:, 0], config)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
    done = done | jnp.any(nxt[:, None] == eos_ids[None, :], axis=-1)
    return t + 1, nxt, cache_k, cache_v, done, out

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < n) & ~jnp.all(done)

  start = jnp.full((batch,), start_id, jnp.int32)
  out = jnp.full((batch, n), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  carry = (jnp.asarray(0, jnp.int32), start, cache_k, cache_v, done, out)
  return jax.lax.while_loop(cond, step, carry)[-1]


def generate(model: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             decoder_start_token_id: int | None = None) -> jax.Array:
  """Greedy decoding from a T5 model.

  Args:
    model: a ``T5Model``.
    input_ids: encoder inputs ``[B, S]`` (right padding with ``attention_mask`` as usual for T5).
    attention_mask: ``[B, S]``, 1 for real tokens; None means no padding.
    max_new_tokens: tokens to generate (the decoder start token is not counted nor returned).
    eos_token_id: end id (or ids); defaults to the config's. A sequence stops after its first end token.
    pad_token_id: fills positions after a sequence's end; defaults to the config's.
    decoder_start_token_id: first decoder input; defaults to the config's.

  Returns:
    int32 ``[B, max_new_tokens]``: the new tokens, the end token included, padding after it.
  """
  config: T5Config = model.config
  if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape {input_ids.shape}")
  pad = config.pad_token_id if pad_token_id is None else pad_token_id
  start = config.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
  return greedy(model.params(), input_ids, attention_mask, _eos_array(eos_token_id, config),
                jnp.asarray(pad, jnp.int32), jnp.asarray(start, jnp.int32), config=config,
                max_new_tokens=int(max_new_tokens))
