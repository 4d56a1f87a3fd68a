"""Input covariances of the constrained matrices on calibration batches (basis source ``activations``, DESIGN 4b).

For a matrix W ``[out, in]`` applied as ``y = x W^T`` the statistic is ``C = sum_t x_t x_t^T`` ``[in, in]`` over
the real (non-pad) tokens of the calibration batches; ``compute_subspaces(..., covariances=...)`` takes its
top eigenvectors in the complement as the new right basis.

The models expose block inputs and outputs (``block_hidden_states``) but not the input of every matrix inside a
block, so the family's block is re-run here from each block's input, using the family's own primitives
(``rms_norm``, ``linear``, ``attend``, ...) and recording the input of every matrix on the way. ``block_check``
returns the recomputed block outputs so a test can assert that the taps follow the model exactly. A family's
``matrix_input_covariances(model, batches)`` in ``clsvd_jax.models`` takes precedence when it exists.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clsvd_jax.train import model_io


def _cov(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum_t x_t x_t^T`` over the tokens where ``mask`` is 1; x ``[B, T, n]``, mask ``[B, T]``."""
  x = x.astype(jnp.float32) * mask.astype(jnp.float32)[..., None]
  return jnp.einsum("bti,btj->ij", x, x, precision=jax.lax.Precision.HIGHEST)


def _t5_block_taps(p: Any, h: jax.Array, *, config: Any, decoder: bool, bias: jax.Array, self_mask: jax.Array,
                   token_mask: jax.Array, enc: jax.Array | None = None, enc_mask: jax.Array | None = None,
                   cross_mask: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
  """One T5 block from its input ``h``: the covariances of every matrix input and the block output."""
  from clsvd_jax.models.t5 import model as t5

  eps = config.layer_norm_epsilon
  heads = lambda x: x.reshape(*x.shape[:-1], config.num_heads, config.d_kv)
  covs = {}
  sa = p["self_attn"]
  x = t5.rms_norm(h, p["self_attn_norm"]["scale"], eps)
  c = _cov(x, token_mask)
  covs.update({"self_attn/q": c, "self_attn/k": c, "self_attn/v": c})
  a = t5.attend(*(heads(t5.linear(x, sa[n]["weight"])) for n in ("q", "k", "v")), bias, self_mask)
  covs["self_attn/o"] = _cov(a, token_mask)
  h = h + t5.linear(a, sa["o"]["weight"])
  if decoder:
    ca = p["cross_attn"]
    x = t5.rms_norm(h, p["cross_attn_norm"]["scale"], eps)
    covs["cross_attn/q"] = _cov(x, token_mask)
    c_enc = _cov(enc, enc_mask)
    covs.update({"cross_attn/k": c_enc, "cross_attn/v": c_enc})
    keys, values = heads(t5.linear(enc, ca["k"]["weight"])), heads(t5.linear(enc, ca["v"]["weight"]))
    a = t5.attend(heads(t5.linear(x, ca["q"]["weight"])), keys, values, None, cross_mask)
    covs["cross_attn/o"] = _cov(a, token_mask)
    h = h + t5.linear(a, ca["o"]["weight"])
  mlp = p["mlp"]
  x = t5.rms_norm(h, p["mlp_norm"]["scale"], eps)
  c = _cov(x, token_mask)
  if config.is_gated_act:
    covs.update({"mlp/wi_0": c, "mlp/wi_1": c})
    hidden = t5.activation(config.dense_act_fn, t5.linear(x, mlp["wi_0"]["weight"])) * t5.linear(
        x, mlp["wi_1"]["weight"])
  else:
    covs["mlp/wi"] = c
    hidden = t5.activation(config.dense_act_fn, t5.linear(x, mlp["wi"]["weight"]))
  hidden = hidden.astype(mlp["wo"]["weight"].dtype)
  covs["mlp/wo"] = _cov(hidden, token_mask)
  return covs, h + t5.linear(hidden, mlp["wo"]["weight"])


@functools.partial(jax.jit, static_argnames=("config",))
def _t5_taps(params: Any, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array,
             decoder_attention_mask: jax.Array, *, config: Any) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  from clsvd_jax.models.t5 import model as t5

  enc_final, (enc_in, _) = t5.encode(params, input_ids, attention_mask, config=config, collect=True)
  _, (dec_in, _) = t5.decode(params, decoder_input_ids, enc_final, attention_mask, decoder_attention_mask,
                             config=config, collect=True)
  s = input_ids.shape[1]
  t = decoder_input_ids.shape[1]
  key_mask = lambda m: m.astype(bool)[:, None, None, :]
  enc_bias = t5.position_bias(params["encoder"]["relative_attention_bias"]["embedding"], jnp.arange(s), s,
                              bidirectional=True, config=config)
  dec_bias = t5.position_bias(params["decoder"]["relative_attention_bias"]["embedding"], jnp.arange(t), t,
                              bidirectional=False, config=config)
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  enc_taps = functools.partial(_t5_block_taps, config=config, decoder=False, bias=enc_bias,
                               self_mask=key_mask(attention_mask), token_mask=attention_mask)
  dec_taps = functools.partial(_t5_block_taps, config=config, decoder=True, bias=dec_bias,
                               self_mask=causal & key_mask(decoder_attention_mask), token_mask=decoder_attention_mask,
                               enc=enc_final, enc_mask=attention_mask, cross_mask=key_mask(attention_mask))
  enc_covs, enc_out = jax.vmap(enc_taps)(params["encoder"]["layers"], enc_in)
  dec_covs, dec_out = jax.vmap(dec_taps)(params["decoder"]["layers"], dec_in)
  covs = {f"encoder/layers/{k}/weight": v for k, v in enc_covs.items()}
  covs.update({f"decoder/layers/{k}/weight": v for k, v in dec_covs.items()})
  return covs, {"encoder/layers": enc_out, "decoder/layers": dec_out}


def _t5_batch(batch: Mapping[str, Any]) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(batch[k], jnp.int32)
               for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"))


def block_check(model: Any, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Block outputs recomputed by the taps, ``{stack: [L, B, T, D]}`` (to compare with ``block_hidden_states``)."""
  family = model_io.family_of(model)
  if family != "t5":
    raise NotImplementedError(f"matrix-input taps exist for the t5 family only, not {family!r}")
  _, outs = _t5_taps(model.params(), *_t5_batch(batch), config=model.config)
  return outs


def matrix_input_covariances(model: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
  """``{path: [L, n, n]}`` sums of ``x x^T`` over the real tokens of ``batches`` for every attention / MLP matrix.

  Raises:
    NotImplementedError: for a family without taps (use ``osft.basis_source: weights`` there).
  """
  models_fn = getattr(model_io._models_package(), "matrix_input_covariances", None)
  if models_fn is not None:
    return dict(models_fn(model, batches))
  family = model_io.family_of(model)
  if family != "t5":
    raise NotImplementedError(f"basis_source 'activations' needs matrix inputs, which the {family!r} family does not "
                              "expose yet; use osft.basis_source: weights")
  total: dict[str, jax.Array] = {}
  params = model.params()
  for batch in batches:
    covs, _ = _t5_taps(params, *_t5_batch(batch), config=model.config)
    total = covs if not total else {k: total[k] + v for k, v in covs.items()}
  return total
