"""Greedy decoding for LLaMA with a key/value cache.

One jitted function per (config, batch shape, ``max_new_tokens``): the left-padded prompt runs once through all
blocks (prefill), filling the first ``T`` slots of a fixed-size cache ``[L, B, T + N, KV, hd]``; then a
``jax.lax.while_loop`` feeds one token per step, writing each block's new key/value into its slot in place. Both
run the model's one ``block`` function with a ``KVCache``. Shapes
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

from clsvd_jax.models import common
from clsvd_jax.models.layers import KVCache
from clsvd_jax.models.llama import model as llama
from clsvd_jax.models.llama.config import LlamaConfig


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def greedy(params: llama.Params, input_ids: jax.Array, attention_mask: jax.Array, eos_ids: jax.Array,
           pad_id: jax.Array, *, config: LlamaConfig, max_new_tokens: int) -> jax.Array:
  """The jitted prefill + decode loop behind ``generate`` (arguments already normalised to arrays)."""
  batch, prompt_len = input_ids.shape
  n = max_new_tokens
  embed = params["embed_tokens"]["embedding"]

  # Prefill: the whole prompt through every block, its keys and values written to cache slots 0 .. T - 1. The
  # slots after the prompt are empty and masked out.
  x, inputs = llama.embed_prompt(params, input_ids, attention_mask, None, config)
  inputs = inputs._replace(mask=jnp.pad(inputs.mask, ((0, 0), (0, 0), (0, n))))
  cache = KVCache.zeros(config.num_hidden_layers, batch, prompt_len + n, config.num_key_value_heads,
                        config.head_dim, embed.dtype)
  h, cache, _ = llama.run_blocks(params, x, inputs, config, cache=cache)
  # Left padding: the last column is every row's last prompt token.
  first = _next_token(params, h[:, -1], config)
  out = jnp.full((batch, n), pad_id, jnp.int32).at[:, 0].set(first)
  done = common.is_eos(first, eos_ids)
  valid = jnp.concatenate([attention_mask.astype(bool), jnp.zeros((batch, n), bool)], axis=1)
  lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)

  def step(carry):
    # Token i is produced from token i - 1, which goes to cache slot T + i - 1 at position length + i - 1.
    i, token, cache, valid, done, out = carry
    slot = prompt_len + i - 1
    valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((batch, 1), bool), slot, axis=1)
    inputs = llama.block_inputs((lengths + i - 1)[:, None], valid[:, None, :], config, embed.dtype)
    h, cache, _ = llama.run_blocks(params, embed[token][:, None], inputs, config, cache=cache.at(slot))
    nxt = jnp.where(done, pad_id, _next_token(params, h[:, 0], config))
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
    return i + 1, nxt, cache, valid, done | common.is_eos(nxt, eos_ids), out

  def cond(carry):
    i, *_, done, _ = carry
    return (i < n) & ~jnp.all(done)

  carry = (jnp.asarray(1, jnp.int32), first, cache, valid, done, out)
  return jax.lax.while_loop(cond, step, carry)[-1]


def _next_token(params: llama.Params, h: jax.Array, config: LlamaConfig) -> jax.Array:
  """Greedy next token ``[B]`` from the last block's output ``[B, D]``."""
  logits = llama.lm_logits(params, llama.final_norm(params, h, config), config)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


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
  input_ids, attention_mask = common.prompt_arrays(input_ids, attention_mask, max_new_tokens)
  if not bool(jnp.all(attention_mask[:, -1] > 0)):
    raise ValueError("generate needs LEFT-padded prompts: attention_mask[:, -1] must be 1 for every row (pad on the "
                     "left, e.g. tokenizer.padding_side = 'left')")
  eos = common.eos_array(eos_token_id, config.eos_token_ids)
  if pad_token_id is None:
    pad_token_id = config.pad_token_id
  if pad_token_id is None:
    pad_token_id = max(int(eos[0]), 0)
  return greedy(model.params(), input_ids, attention_mask, eos, jnp.asarray(pad_token_id, jnp.int32), config=config,
                max_new_tokens=int(max_new_tokens))
