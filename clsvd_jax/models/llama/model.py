"""LLaMA decoder in Flax NNX, computing what transformers' PyTorch ``LlamaForCausalLM`` computes.

The NNX modules only hold parameters; the network is a set of pure functions of a nested dict of arrays
(``forward``, ``run_layers``, ``block``), so ``model(...)``, the functional interface used by the runner and the
sharding code, block hidden states and greedy decoding all run the same code. Layers are stacked on a leading axis
and run with ``jax.lax.scan``: one compiled block whatever the depth, and every matrix of a kind is one
``[L, out, in]`` array for the batched SVD of the subspace code.

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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsvd_jax.models.llama.config import LlamaConfig

Params = dict[str, Any]

# ----------------------------------------------------------------------------------------------------------------
# Parameter containers (NNX). Attribute names are the parameter paths of the library's contract.
# ----------------------------------------------------------------------------------------------------------------


class Linear(nnx.Module):
  """A linear map with its weight in Hugging Face orientation ``[..., out, in]`` (``y = x @ W.T + b``)."""

  def __init__(self, p: Mapping[str, Any]):
    self.weight = nnx.Param(p["weight"])
    if "bias" in p:
      self.bias = nnx.Param(p["bias"])


class RMSNorm(nnx.Module):
  """RMS norm scale."""

  def __init__(self, p: Mapping[str, Any]):
    self.scale = nnx.Param(p["scale"])


class Embed(nnx.Module):
  """The token embedding ``[vocab, D]``."""

  def __init__(self, p: Mapping[str, Any]):
    self.embedding = nnx.Param(p["embedding"])


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


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def flat_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` for every parameter of this config."""
  out = {}

  def walk(prefix: str, node: Any):
    if _is_shape(node):
      out[prefix] = node
      return
    for k, v in node.items():
      walk(f"{prefix}/{k}" if prefix else k, v)

  walk("", param_shapes(config))
  return out


def unflatten(flat: Mapping[str, Any]) -> Params:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  out: Params = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def check_params(config: LlamaConfig, params: Mapping[str, Any]) -> None:
  """Raises ``ValueError`` naming the first parameter path that is missing, unexpected or of the wrong shape."""
  from clsvd_jax._src.tree_paths import flatten_with_paths

  want = flat_shapes(config)
  have = flatten_with_paths(params)
  for path, shape in want.items():
    if path not in have:
      raise ValueError(f"LLaMA parameters lack {path!r} (expected shape {shape})")
    if tuple(np.shape(have[path])) != shape:
      raise ValueError(f"LLaMA parameter {path!r} has shape {tuple(np.shape(have[path]))}, expected {shape}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"LLaMA parameters hold unexpected entries {extra} for this config (tie_word_embeddings="
                     f"{config.tie_word_embeddings}, attention_bias={config.attention_bias}, "
                     f"mlp_bias={config.mlp_bias})")


def init_params(config: LlamaConfig, *, seed: int = 0, dtype: Any = jnp.float32) -> Params:
  """Random parameters as transformers initialises LLaMA: weights and embeddings ``N(0, initializer_range)``
  (``config.extra``, default 0.02), biases zero, norm scales one."""
  std = float(config.extra.get("initializer_range", 0.02))
  return _init_params(config, jnp.asarray(seed, jnp.uint32), jnp.dtype(dtype), std)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "std"))
def _init_params(config: LlamaConfig, seed: jax.Array, dtype: Any, std: float) -> Params:
  # One draw for all tensors, sliced afterwards: a separate draw per tensor costs seconds of CPU compile time.
  flat = flat_shapes(config)
  sizes = [math.prod(shape) for shape in flat.values()]
  noise = jax.random.normal(jax.random.key(seed), (sum(sizes),), jnp.float32)
  out = {}
  offset = 0
  for (path, shape), size in zip(flat.items(), sizes, strict=True):
    if path.endswith("/scale"):
      out[path] = jnp.ones(shape, dtype)
    elif path.endswith("/bias"):
      out[path] = jnp.zeros(shape, dtype)
    else:
      out[path] = (std * noise[offset:offset + size].reshape(shape)).astype(dtype)
    offset += size
  return unflatten(out)


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


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """``scale * x / rms(x)``: mean of squares in float32, normalised values cast back to ``x``'s dtype first."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


def linear(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
  """``x @ W.T (+ b)`` for a ``{"weight": [out, in], "bias"?: [out]}`` dict."""
  y = jnp.einsum("...i,oi->...o", x, p["weight"])
  return y + p["bias"] if "bias" in p else y


def activation(name: str, x: jax.Array) -> jax.Array:
  """The config's ``hidden_act``."""
  if name in ("silu", "swish"):
    return jax.nn.silu(x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unsupported LLaMA activation {name!r}")


def mlp(p: Params, x: jax.Array, config: LlamaConfig) -> jax.Array:
  """SwiGLU feed forward."""
  return linear(activation(config.hidden_act, linear(x, p["gate_proj"])) * linear(x, p["up_proj"]), p["down_proj"])


def qkv(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
        config: LlamaConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rotated queries ``[B, T, H, hd]``, rotated keys and values ``[B, T, KV, hd]`` of normed inputs ``x``."""
  hd = config.head_dim
  q = linear(x, p["q_proj"]).reshape(*x.shape[:-1], config.num_attention_heads, hd)
  k = linear(x, p["k_proj"]).reshape(*x.shape[:-1], config.num_key_value_heads, hd)
  v = linear(x, p["v_proj"]).reshape(*x.shape[:-1], config.num_key_value_heads, hd)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: LlamaConfig) -> jax.Array:
  """Scaled dot-product attention with grouped key/value heads.

  Args:
    q: ``[B, T, H, hd]``; k, v: ``[B, S, KV, hd]``.
    mask: boolean ``[B, T, S]``; False keys get no weight. A query without any allowed key (a left pad) averages all
      keys instead of producing NaN; its output is never used.
    config: the config (head counts).

  Returns:
    ``[B, T, H * hd]`` in ``v``'s dtype.
  """
  b, t = q.shape[:2]
  q = q.reshape(b, t, config.num_key_value_heads, config.num_groups, config.head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (config.head_dim**-0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  return out.reshape(b, t, -1)


def block(p: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, config: LlamaConfig) -> jax.Array:
  """One decoder block (pre-norm attention, pre-norm SwiGLU, residuals) over a whole sequence."""
  eps = config.rms_norm_eps
  q, k, v = qkv(p["self_attn"], rms_norm(h, p["input_layernorm"]["scale"], eps), cos, sin, config)
  h = h + linear(attend(q, k, v, mask, config), p["self_attn"]["o_proj"])
  return h + mlp(p["mlp"], rms_norm(h, p["post_attention_layernorm"]["scale"], eps), config)


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


def run_layers(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *, config: LlamaConfig,
               collect: bool = False) -> tuple[jax.Array, Any]:
  """Embedding and all blocks: the final normed hidden states ``[B, T, D]`` and, with ``collect``, every block's
  ``(inputs, outputs)`` stacked ``[L, B, T, D]``."""
  x = params["embed_tokens"]["embedding"][input_ids]
  if position_ids is None:
    position_ids = default_positions(input_ids, attention_mask)
  cos, sin = rope_tables(position_ids, config, x.dtype)
  mask = causal_mask(input_ids, attention_mask)

  def body(h, p):
    out = block(p, h, cos, sin, mask, config)
    return out, ((h, out) if collect else None)

  x, states = jax.lax.scan(body, x, params["layers"])
  return rms_norm(x, params["norm"]["scale"], config.rms_norm_eps), states


def lm_logits(params: Params, hidden: jax.Array, config: LlamaConfig) -> jax.Array:
  """Float32 logits from final normed hidden states."""
  head = params["embed_tokens"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["weight"]
  return jnp.einsum("...d,vd->...v", hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)


def forward(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            position_ids: jax.Array | None = None, *, config: LlamaConfig) -> jax.Array:
  """Logits ``[B, T, vocab]`` (float32): the pure function behind ``LlamaModel.__call__``."""
  hidden, _ = run_layers(params, input_ids, attention_mask, position_ids, config=config)
  return lm_logits(params, hidden, config)


forward_jit = jax.jit(forward, static_argnames=("config",))


@functools.partial(jax.jit, static_argnames=("config",))
def block_states(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *,
                 config: LlamaConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{"layers": (inputs, outputs)}``, each ``[L, B, T, D]``; block ``l``'s output is block ``l + 1``'s input."""
  _, states = run_layers(params, input_ids, attention_mask, position_ids, config=config, collect=True)
  return {"layers": states}


def _cov(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum_t x_t x_t^T`` (float32) over the tokens where ``mask`` is 1; x ``[B, T, n]``."""
  x = x.astype(jnp.float32) * mask.astype(jnp.float32)[..., None]
  return jnp.einsum("bti,btj->ij", x, x, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("config",))
def input_covariances(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      config: LlamaConfig) -> dict[str, jax.Array]:
  """``{matrix path: [L, in, in]}``: the sum of ``x x^T`` over real tokens of every constrained matrix's input.

  q/k/v and gate/up share their input (the normed block input), so they share a covariance.
  """
  eps = config.rms_norm_eps
  token_mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
  x = params["embed_tokens"]["embedding"][input_ids]
  cos, sin = rope_tables(default_positions(input_ids, attention_mask), config, x.dtype)
  mask = causal_mask(input_ids, attention_mask)

  def body(h, p):
    a = p["self_attn"]
    normed = rms_norm(h, p["input_layernorm"]["scale"], eps)
    c_in = _cov(normed, token_mask)
    q, k, v = qkv(a, normed, cos, sin, config)
    heads_out = attend(q, k, v, mask, config)
    c_o = _cov(heads_out, token_mask)
    h = h + linear(heads_out, a["o_proj"])
    normed = rms_norm(h, p["post_attention_layernorm"]["scale"], eps)
    c_mlp = _cov(normed, token_mask)
    m = p["mlp"]
    hidden = activation(config.hidden_act, linear(normed, m["gate_proj"])) * linear(normed, m["up_proj"])
    c_down = _cov(hidden, token_mask)
    return h + linear(hidden, m["down_proj"]), (c_in, c_o, c_mlp, c_down)

  _, (c_in, c_o, c_mlp, c_down) = jax.lax.scan(body, x, params["layers"])
  out = {f"layers/self_attn/{n}_proj/weight": c_in for n in ("q", "k", "v")}
  out["layers/self_attn/o_proj/weight"] = c_o
  out.update({f"layers/mlp/{n}_proj/weight": c_mlp for n in ("gate", "up")})
  out["layers/mlp/down_proj/weight"] = c_down
  return out
