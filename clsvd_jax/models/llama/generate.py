"""Greedy decoding for LLaMA with a key/value cache.

One jitted function per (config, batch shape, ``max_new_tokens``): the left-padded prompt runs once through all
blocks (prefill), filling the first ``T`` slots of a fixed-size cache ``[L, B, T + N, KV, hd]``; then a
``jax.lax.while_loop`` feeds one token per step, writing each block's new key/value into its slot in place. Shapes
never change inside the loop, so nothing recompiles per step, and the loop ends as soon as every sequence has
produced an end token. Positions follow transformers' ``generate``: ``cumsum(mask) - 1`` over the prompt, then one
more per new token, so a left-padded row decodes exactly as it would unpadded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax.models.llama import model as llama
from clsvd_jax.models.llama.config import LlamaConfig


def eos_array(eos_token_id: int | Sequence[int] | None, default: Sequence[int]) -> jax.Array:
  """End ids as an int32 vector padded with -1 (never a token) to a multiple of 4 entries, so that a different
  number of end ids rarely means a new compilation. All -1: no sequence ends early."""
  if eos_token_id is None:
    ids = tuple(default)
  elif isinstance(eos_token_id, int | np.integer):
    ids = (int(eos_token_id),)
  else:
    ids = tuple(int(e) for e in eos_token_id)
  size = max(4, -(-len(ids) // 4) * 4)
  return jnp.asarray(ids + (-1,) * (size - len(ids)), jnp.int32)


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def greedy(params: llama.Params, input_ids: jax.Array, attention_mask: jax.Array, eos_ids: jax.Array,
           pad_id: jax.Array, *, config: LlamaConfig, max_new_tokens: int) -> jax.Array:
  """The jitted prefill + decode loop behind ``generate`` (arguments already normalised to arrays)."""
  batch, prompt_len = input_ids.shape
  n = max_new_tokens
  eps = config.rms_norm_eps
  layers = params["layers"]
  embed = params["embed_tokens"]["embedding"]
  dtype = embed.dtype

  # Prefill: the whole prompt through every block, keeping each block's rotated keys and values.
  positions = llama.default_positions(input_ids, attention_mask)
  cos, sin = llama.rope_tables(positions, config, dtype)
  mask = llama.causal_mask(input_ids, attention_mask)

  def prefill_block(h, p):
    q, k, v = llama.qkv(p["self_attn"], llama.rms_norm(h, p["input_layernorm"]["scale"], eps), cos, sin, config)
    h = h + llama.linear(llama.attend(q, k, v, mask, config), p["self_attn"]["o_proj"])
    h = h + llama.mlp(p["mlp"], llama.rms_norm(h, p["post_attention_layernorm"]["scale"], eps), config)
    return h, (k, v)

  h, (keys, values) = jax.lax.scan(prefill_block, embed[input_ids], layers)
  grow = ((0, 0), (0, 0), (0, n), (0, 0), (0, 0))
  cache_k, cache_v = jnp.pad(keys, grow), jnp.pad(values, grow)
  # Left padding: the last column is every row's last prompt token.
  last = llama.rms_norm(h[:, -1], params["norm"]["scale"], eps)
  first = jnp.argmax(llama.lm_logits(params, last, config), axis=-1).astype(jnp.int32)
  out = jnp.full((batch, n), pad_id, jnp.int32).at[:, 0].set(first)
  done = _is_eos(first, eos_ids)
  valid = jnp.concatenate([attention_mask.astype(bool), jnp.zeros((batch, n), bool)], axis=1)
  lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
  layer_index = jnp.arange(config.num_hidden_layers)

  def step(carry):
    # Token i is produced from token i - 1, which sits in cache slot T + i - 1 at position length + i - 1.
    i, token, cache_k, cache_v, valid, done, out = carry
    slot = prompt_len + i - 1
    valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((batch, 1), bool), slot, axis=1)
    cos, sin = llama.rope_tables((lengths + i - 1)[:, None], config, dtype)
    key_mask = valid[:, None, :]

    def layer(carry, xs):
      h, cache_k, cache_v = carry
      p, layer_i = xs
      q, k, v = llama.qkv(p["self_attn"], llama.rms_norm(h, p["input_layernorm"]["scale"], eps), cos, sin, config)
      # In-place writes into the full cache carried through the scan (no per-step copy of the cache).
      cache_k = jax.lax.dynamic_update_slice(cache_k, k[None], (layer_i, 0, slot, 0, 0))
      cache_v = jax.lax.dynamic_update_slice(cache_v, v[None], (layer_i, 0, slot, 0, 0))
      a = llama.attend(q, cache_k[layer_i], cache_v[layer_i], key_mask, config)
      h = h + llama.linear(a, p["self_attn"]["o_proj"])
      h = h + llama.mlp(p["mlp"], llama.rms_norm(h, p["post_attention_layernorm"]["scale"], eps), config)
      return (h, cache_k, cache_v), None

    (h, cache_k, cache_v), _ = jax.lax.scan(layer, (embed[token][:, None], cache_k, cache_v), (layers, layer_index))
    hidden = llama.rms_norm(h[:, 0], params["norm"]["scale"], eps)
    nxt = jnp.argmax(llama.lm_logits(params, hidden, config), axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
    done = done | _is_eos(nxt, eos_ids)
    return i + 1, nxt, cache_k, cache_v, valid, done, out

  def cond(carry):
    i, *_, done, _ = carry
    return (i < n) & ~jnp.all(done)

  carry = (jnp.asarray(1, jnp.int32), first, cache_k, cache_v, valid, done, out)
  return jax.lax.while_loop(cond, step, carry)[-1]


def generate(model: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> jax.Array:
  """Greedy decoding from a LLaMA model.

  Args:
    model: a ``LlamaModel``.
    input_ids: prompts ``[B, T]``, LEFT-padded (the last column must be every row's last prompt token).
    attention_mask: ``[B, T]``, 1 for real tokens; None means no padding.
    max_new_tokens: tokens to generate.
    eos_token_id: end id (or ids); defaults to the config's. A sequence stops after its first end token.
    pad_token_id: fills positions after a sequence's end; defaults to the config's, else the first end id, else 0.

  Returns:
    int32 ``[B, max_new_tokens]``: the new tokens, the end token included, padding after it.

  Raises:
    ValueError: bad shapes, a non-positive ``max_new_tokens``, or a right-padded prompt.
  """
  config: LlamaConfig = model.config
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
  if not bool(jnp.all(attention_mask[:, -1] > 0)):
    raise ValueError("generate needs LEFT-padded prompts: attention_mask[:, -1] must be 1 for every row (pad on the "
                     "left, e.g. tokenizer.padding_side = 'left')")
  eos = eos_array(eos_token_id, config.eos_token_ids)
  if pad_token_id is None:
    pad_token_id = config.pad_token_id
  if pad_token_id is None:
    pad_token_id = max(int(eos[0]), 0)
  return greedy(model.params(), input_ids, attention_mask, eos, jnp.asarray(pad_token_id, jnp.int32), config=config,
                max_new_tokens=int(max_new_tokens))
