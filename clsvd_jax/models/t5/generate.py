"""Greedy decoding for T5 with a decoder self-attention KV cache and precomputed cross-attention keys/values.

One jitted function per (config, batch shape, ``max_new_tokens``): the encoder runs once, every decoder block's
cross-attention keys and values are computed once, and a ``jax.lax.while_loop`` feeds one token per step through
the stacked decoder blocks (the model's own ``decoder_block`` with a ``KVCache``), writing each block's new key/value
into its slot of a fixed-size cache in place. Shapes never change inside the loop, so nothing recompiles per step,
and the loop ends as soon as every sequence has produced an end token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clsvd_jax.models import common
from clsvd_jax.models.layers import KVCache, scan_blocks
from clsvd_jax.models.t5 import model as t5_model
from clsvd_jax.models.t5.config import T5Config


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def greedy(params: t5_model.Params, input_ids: jax.Array, attention_mask: jax.Array, eos_ids: jax.Array,
           pad_id: jax.Array, start_id: jax.Array, *, config: T5Config, max_new_tokens: int) -> jax.Array:
  """The jitted decode loop behind ``generate`` (arguments already normalised to arrays)."""
  batch = input_ids.shape[0]
  n = max_new_tokens
  enc, _ = t5_model.encode(params, input_ids, attention_mask, config=config)
  dec = params["decoder"]
  # [L, B, S, H, d_kv]: every block's cross-attention keys and values, computed once.
  cross = jax.vmap(lambda p: t5_model.kv(p, enc, config))(dec["layers"]["cross_attn"])
  cross_mask = t5_model.key_mask(attention_mask)
  cache = KVCache.zeros(config.num_decoder_layers, batch, n, config.num_heads, config.d_kv, enc.dtype)
  table = dec["relative_attention_bias"]["embedding"]
  key_positions = jnp.arange(n)

  def step(carry):
    # Token t + 1 is produced from token t, which goes to cache slot t.
    t, token, cache, done, out = carry
    bias = t5_model.position_bias(table, t[None], n, bidirectional=False, config=config)
    self_mask = (key_positions <= t)[None, None, :]

    def block(pc, h, **kw):
      p, cross_kv = pc
      return t5_model.decoder_block(p, h, bias=bias, self_mask=self_mask, cross=cross_kv, cross_mask=cross_mask,
                                    config=config, **kw)

    x = params["shared"]["embedding"][token][:, None, :]
    h, cache, _ = scan_blocks(block, (dec["layers"], cross), x, cache=cache.at(t))
    h = t5_model.rms_norm(h, dec["final_norm"]["scale"], config.layer_norm_epsilon)
    nxt = jnp.argmax(t5_model.lm_logits(params, h[:, 0], config), axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
    return t + 1, nxt, cache, done | common.is_eos(nxt, eos_ids), out

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < n) & ~jnp.all(done)

  start = jnp.full((batch,), start_id, jnp.int32)
  out = jnp.full((batch, n), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  carry = (jnp.asarray(0, jnp.int32), start, cache, done, out)
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
  input_ids, attention_mask = common.prompt_arrays(input_ids, attention_mask, max_new_tokens)
  pad = config.pad_token_id if pad_token_id is None else pad_token_id
  start = config.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
  return greedy(model.params(), input_ids, attention_mask, common.eos_array(eos_token_id, config.eos_token_ids),
                jnp.asarray(pad, jnp.int32), jnp.asarray(start, jnp.int32), config=config,
                max_new_tokens=int(max_new_tokens))
