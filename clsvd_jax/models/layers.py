"""The network pieces T5 and LLaMA share, written once: parameter containers, RMS norm, linear maps, activations,
softmax attention (grouped key/value heads, optional additive bias), the output head, a key/value cache, the scan
over stacked blocks, and the token covariance of a matrix input.

A family's block is a pure function ``block(p, h, ..., cache=None, layer=None, taps=None) -> (h, cache)`` of one
layer's parameters; ``scan_blocks`` runs it over the stacked layers. The same block serves the forward pass, the
block hidden states (``observe`` the block's input and output), the input covariances (``observe`` its ``taps``: the
input of every matrix, recorded in a dict) and cached decoding (a ``KVCache`` carried through the scan).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Taps = dict[str, jax.Array] | None

# ----------------------------------------------------------------------------------------------------------------
# Parameter containers (NNX). They only hold parameters; attribute names are the parameter paths.
# ----------------------------------------------------------------------------------------------------------------


class Linear(nnx.Module):
  """A linear map with its weight in Hugging Face orientation ``[..., out, in]`` (``y = x @ W.T (+ b)``)."""

  def __init__(self, p: Mapping[str, Any]):
    self.weight = nnx.Param(p["weight"])
    if "bias" in p:
      self.bias = nnx.Param(p["bias"])


class RMSNorm(nnx.Module):
  """An RMS norm scale."""

  def __init__(self, p: Mapping[str, Any]):
    self.scale = nnx.Param(p["scale"])


class Embed(nnx.Module):
  """An embedding table ``[rows, features]``."""

  def __init__(self, p: Mapping[str, Any]):
    self.embedding = nnx.Param(p["embedding"])


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, normed_dtype: Any = None) -> jax.Array:
  """``scale * x / rms(x)``: no centring, no bias, the mean of squares in float32.

  The normalised values are cast to ``normed_dtype`` before the scale multiply: ``x``'s dtype by default (LLaMA's
  reference), the scale's for T5 (its reference casts to the weight's dtype). Both are no-ops in float32.
  """
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype if normed_dtype is None else normed_dtype)


def linear(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
  """``x @ W.T (+ b)`` for a ``{"weight": [out, in], "bias"?: [out]}`` dict."""
  y = jnp.einsum("...i,oi->...o", x, p["weight"])
  return y + p["bias"] if "bias" in p else y


ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


def activation(name: str, x: jax.Array) -> jax.Array:
  """The Hugging Face activation called ``name`` (one of ``ACTIVATIONS``; ``gelu`` is the exact one)."""
  if name in ("silu", "swish"):
    return jax.nn.silu(x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, bias: jax.Array | None = None,
           scale: float | None = None) -> jax.Array:
  """Softmax attention with grouped key/value heads, logits and softmax in float32.

  Args:
    q: ``[B, T, H, d]``; k, v: ``[B, S, KV, d]`` with ``H`` a multiple of ``KV``: query head ``h`` reads key/value
      head ``h // (H / KV)`` (``KV == H``: plain multi-head attention).
    mask: boolean, broadcastable to ``[B, T, S]``, or None for all keys; False keys get no weight. A query without
      any allowed key (a pad) averages all keys instead of producing NaN, as the references' additive minimum does;
      its output is unused.
    bias: additive ``[1|B, H, T, S]`` (T5's relative position bias) or None.
    scale: multiplies the logits (LLaMA: ``head_dim ** -0.5``); None for none (T5 folds it into ``q``).

  Returns:
    ``[B, T, H * d]`` in ``v``'s dtype.
  """
  b, t, heads, d = q.shape
  groups = heads // k.shape[2]
  q = q.reshape(b, t, k.shape[2], groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  if scale is not None:
    logits = logits * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], k.shape[2], groups, *bias.shape[2:])
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  return out.reshape(b, t, heads * d)


def head_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
  """Float32 logits ``[..., vocab]`` of hidden states through a ``[vocab, D]`` head (or tied embedding)."""
  return jnp.einsum("...d,vd->...v", hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)


def covariance(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum_t x_t x_t^T`` in float32 over the tokens where ``mask`` is 1; ``x`` ``[B, T, n]``, mask ``[B, T]``."""
  x = x.astype(jnp.float32) * mask.astype(jnp.float32)[..., None]
  return jnp.einsum("bti,btj->ij", x, x, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------------------------
# Key/value cache and the scan over blocks
# ----------------------------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
  """Keys and values of every block for cached decoding.

  Attributes:
    keys: ``[L, B, S, KV, d]``: block ``l``'s (rotated) keys at cache slots ``0 .. S - 1``.
    values: ``[L, B, S, KV, d]``.
    slot: int32 scalar, the slot of the first token of the current call (every row writes to the same slots).
  """

  keys: jax.Array
  values: jax.Array
  slot: jax.Array

  @classmethod
  def zeros(cls, layers: int, batch: int, length: int, heads: int, head_dim: int, dtype: Any) -> KVCache:
    """An empty cache of ``length`` slots with ``slot`` 0."""
    keys = jnp.zeros((layers, batch, length, heads, head_dim), dtype)
    return cls(keys, jnp.zeros_like(keys), jnp.asarray(0, jnp.int32))

  def at(self, slot: jax.Array | int) -> KVCache:
    """The same cache, the next call writing from ``slot``."""
    return self._replace(slot=jnp.asarray(slot, jnp.int32))

  def write(self, layer: jax.Array, k: jax.Array, v: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
    """Stores block ``layer``'s new ``k``, ``v`` ``[B, T, KV, d]`` at slots ``slot .. slot + T - 1``.

    The update is a ``dynamic_update_slice`` of the whole carried buffer, which XLA does in place (no copy of the
    cache per token). Returns the cache and that block's keys and values over all slots ``[B, S, KV, d]``.
    """
    at = (layer, 0, self.slot, 0, 0)
    keys = jax.lax.dynamic_update_slice(self.keys, k[None].astype(self.keys.dtype), at)
    values = jax.lax.dynamic_update_slice(self.values, v[None].astype(self.values.dtype), at)
    return self._replace(keys=keys, values=values), keys[layer], values[layer]


def scan_blocks(block: Callable[..., tuple[jax.Array, KVCache | None]], layers: Any, h: jax.Array, *,
                cache: KVCache | None = None,
                observe: Callable[[jax.Array, jax.Array, dict[str, jax.Array]], Any] | None = None
                ) -> tuple[jax.Array, KVCache | None, Any]:
  """Runs ``block`` over the stacked layers with one ``jax.lax.scan`` (one compiled block whatever the depth).

  Args:
    block: ``block(p, h, *, cache, layer, taps) -> (h, cache)`` for one layer's slice ``p`` of ``layers``.
    layers: pytree with the layers on the leading axis of every leaf.
    h: hidden states entering the first block.
    cache: a ``KVCache`` carried through the blocks (each writes its own layer), or None.
    observe: ``observe(block_input, block_output, taps) -> per-layer output``, stacked on a leading layer axis;
      ``taps`` is the dict of matrix inputs the block recorded. None: no taps, no per-layer outputs.

  Returns:
    ``(h, cache, stacked observations or None)``.
  """
  num_layers = jax.tree.leaves(layers)[0].shape[0]

  def body(carry, xs):
    h_in, cache = carry
    p, layer = xs
    taps = {} if observe is not None else None
    h_out, cache = block(p, h_in, cache=cache, layer=layer, taps=taps)
    return (h_out, cache), (None if observe is None else observe(h_in, h_out, taps))

  (h, cache), ys = jax.lax.scan(body, (h, cache), (layers, jnp.arange(num_layers, dtype=jnp.int32)))
  return h, cache, ys


def block_io(h_in: jax.Array, h_out: jax.Array, taps: Any) -> tuple[jax.Array, jax.Array]:
  """An ``observe`` for ``scan_blocks``: every block's input and output."""
  del taps
  return h_in, h_out


def tap_covariances(tokens: jax.Array) -> Callable[[jax.Array, jax.Array, dict[str, jax.Array]], dict[str, Any]]:
  """An ``observe`` for ``scan_blocks``: the ``covariance`` of every tapped matrix input over ``tokens`` [B, T]."""
  return lambda h_in, h_out, taps: {name: covariance(x, tokens) for name, x in taps.items()}
