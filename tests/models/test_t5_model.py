"""T5 module tests that need no checkpoint files: parity through the key map on a torch state_dict, position
buckets, config parsing, the functional interface, block hidden states, the teacher-forcing helper and the decoding
loop (early stop, padding, one compile)."""

import copy
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _numerics import GRAD_ULPS, LOGITS_ULPS, assert_close_at_scale
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from clsvd_jax import ParamPolicy
from clsvd_jax._src.tree_paths import flatten_with_paths
from clsvd_jax.models import t5
from clsvd_jax.models.t5 import model as t5_model
from clsvd_jax.models.t5 import params as t5_params

# The package exports the function `generate`, which shadows the submodule's attribute name.
t5_decoding = importlib.import_module("clsvd_jax.models.t5.generate")

# Tiny models: torch's intra-op threads only spin against JAX's on a small CPU (20x slower generate).
torch.set_num_threads(1)

VOCAB = 96


def _torch_model(feed_forward_proj: str, untie: bool, seed: int = 0, vivid: bool = False
                 ) -> T5ForConditionalGeneration:
  hf = HFT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  feed_forward_proj=feed_forward_proj, tie_word_embeddings=not untie, decoder_start_token_id=0)
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(hf).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not vivid:
        break
      # Larger block weights and position bias make the random model's output depend on its context (varied
      # greedy tokens instead of one token repeated).
      if name.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
        p.mul_(2.0)
      elif "relative_attention_bias" in name:
        p.mul_(10.0)
      elif "layer_norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  if untie:
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  return model


def _jax_model(tm: T5ForConditionalGeneration, untie: bool) -> t5.T5Model:
  config = t5.config_from_hf(tm.config.to_dict())
  config = dataclasses.replace(config, tie_word_embeddings=not untie)
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  flat = t5_params.from_hf(config, lambda n: sd[n])
  return t5.T5Model(config, t5_params.unflatten({k: jnp.asarray(v) for k, v in flat.items()}))


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, VOCAB, (3, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  dec = rng.randint(2, VOCAB, (3, 5))
  dec_mask = np.ones_like(dec)
  dec_mask[0, 3:] = 0
  dec[dec_mask == 0] = 0
  return ids, mask, dec, dec_mask


@pytest.fixture(scope="module", params=[("relu", False), ("gated-gelu", True)], ids=["v1_0", "v1_1"])
def pair(request):
  ff, untie = request.param
  tm = _torch_model(ff, untie)
  return tm, _jax_model(tm, untie)


@pytest.fixture(scope="module")
def gated():
  tm = _torch_model("gated-gelu", True, seed=1, vivid=True)
  return tm, _jax_model(tm, True)


def test_logits_match_torch_state_dict(pair):
  tm, model = pair
  ids, mask, dec, dec_mask = _batch()
  with torch.no_grad():
    ref = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
             decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
  ours = np.asarray(model(ids, dec, mask, dec_mask))
  assert ours.dtype == np.float32 and ours.shape == (3, 5, VOCAB)
  assert_close_at_scale(ours, ref, ulps=LOGITS_ULPS)


def test_relative_position_bucket_matches_torch():
  rel = np.arange(-700, 700)
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 20), (64, 256), (16, 300)):
      want = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                   num_buckets=buckets, max_distance=distance).numpy()
      got = np.asarray(t5_model.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                                         num_buckets=buckets, max_distance=distance))
      np.testing.assert_array_equal(got, want, err_msg=f"bidirectional={bidirectional} {buckets} {distance}")


def test_config_v4_and_v5_head_flags():
  base = {"model_type": "t5", "vocab_size": 10, "d_model": 8, "d_kv": 2, "d_ff": 16, "num_layers": 1, "num_heads": 4}
  v10 = t5.config_from_hf(base)
  assert v10.tie_word_embeddings and v10.scale_decoder_outputs and not v10.is_gated_act
  assert v10.dense_act_fn == "relu" and v10.num_decoder_layers == 1 and v10.decoder_start_token_id == 0
  # flan-t5 / v1.1 config.json as written by transformers v4.
  v11 = t5.config_from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
  assert not v11.tie_word_embeddings and not v11.scale_decoder_outputs
  assert v11.is_gated_act and v11.dense_act_fn == "gelu_new"
  # transformers v5 writes tie=True and an explicit scale flag.
  v5 = t5.config_from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": True,
                          "scale_decoder_outputs": False, "eos_token_id": [1, 5]})
  assert v5.tie_word_embeddings and not v5.scale_decoder_outputs and v5.eos_token_ids == (1, 5)
  for c in (v10, v11, v5):
    d = t5.config_to_hf(c)
    assert t5.config_from_hf(d) == c
    hf = HFT5Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf.scale_decoder_outputs == c.scale_decoder_outputs and hf.dense_act_fn == c.dense_act_fn
    assert hf.is_gated_act == c.is_gated_act and hf.num_decoder_layers == c.num_decoder_layers
  kept = t5.config_from_hf({**base, "n_positions": 512, "task_specific_params": {"a": 1}})
  assert t5.config_to_hf(kept)["task_specific_params"] == {"a": 1}


def test_config_errors_name_source_and_field():
  base = {"vocab_size": 10, "d_model": 8, "d_kv": 2, "d_ff": 16, "num_layers": 1, "num_heads": 4}
  with pytest.raises(ValueError, match=r"/x/config.json.*'feed_forward_proj'"):
    t5.config_from_hf({**base, "feed_forward_proj": "gelu-gated-x"}, source="/x/config.json")
  with pytest.raises(ValueError, match=r"/x/config.json.*'d_model'"):
    t5.config_from_hf({k: v for k, v in base.items() if k != "d_model"}, source="/x/config.json")
  with pytest.raises(ValueError, match=r"'mish'.*supported"):
    t5.config_from_hf({**base, "feed_forward_proj": "mish"}, source="/x/config.json")
  with pytest.raises(ValueError, match=r"'num_heads'"):
    t5.config_from_hf({**base, "num_heads": 0}, source="/x/config.json")


def test_shift_right_matches_torch(pair):
  tm, model = pair
  labels = np.array([[5, 6, 1, -100, -100], [7, 8, 9, 10, 1]])
  want = tm._shift_right(torch.tensor(labels)).numpy()
  got = np.asarray(t5.shift_right(labels, model.config.decoder_start_token_id, model.config.pad_token_id))
  np.testing.assert_array_equal(got, want)


def test_functional_and_update_model_round_trip(gated):
  _, model = gated
  ids, mask, dec, dec_mask = _batch(1)
  apply_fn, params = t5.functional(model)
  before = np.asarray(model(ids, dec, mask, dec_mask))
  np.testing.assert_allclose(np.asarray(jax.jit(apply_fn)(params, ids, dec, mask, dec_mask)), before, atol=1e-5)
  assert set(flatten_with_paths(params)) == set(t5_model.flat_shapes(model.config))
  new = jax.tree.map(lambda x: x, params)
  new["decoder"]["layers"]["mlp"]["wo"]["weight"] = 0.5 * params["decoder"]["layers"]["mlp"]["wo"]["weight"]
  t5.update_model(model, new)
  after = np.asarray(model(ids, dec, mask, dec_mask))
  assert np.abs(after - before).max() > 1e-3
  np.testing.assert_allclose(after, np.asarray(jax.jit(apply_fn)(new, ids, dec, mask, dec_mask)), atol=1e-4)
  t5.update_model(model, params)
  np.testing.assert_allclose(np.asarray(model(ids, dec, mask, dec_mask)), before, atol=1e-6)
  bad = jax.tree.map(lambda x: x, params)
  bad["encoder"]["layers"]["self_attn"]["q"]["weight"] = jnp.zeros((2, 3, 3))
  with pytest.raises(ValueError, match="encoder/layers/self_attn/q/weight"):
    t5.update_model(model, bad)
  del bad["encoder"]["layers"]["self_attn"]["q"]
  with pytest.raises(ValueError, match="encoder/layers/self_attn/q/weight"):
    t5.update_model(model, bad)


def test_block_hidden_states(gated):
  _, model = gated
  ids, mask, dec, dec_mask = _batch(2)
  states = t5.block_hidden_states(model, ids, dec, mask, dec_mask)
  assert set(states) == {"encoder/layers", "decoder/layers"}
  enc_in, enc_out = states["encoder/layers"]
  dec_in, dec_out = states["decoder/layers"]
  assert enc_in.shape == enc_out.shape == (2, 3, 9, 32)
  assert dec_in.shape == dec_out.shape == (3, 3, 5, 32)
  np.testing.assert_allclose(enc_in[1:], enc_out[:-1])
  np.testing.assert_allclose(dec_in[1:], dec_out[:-1])
  emb = np.asarray(model.shared.embedding.get_value())
  np.testing.assert_allclose(enc_in[0], emb[ids])
  np.testing.assert_allclose(dec_in[0], emb[dec])
  params = model.params()
  enc, _ = t5_model.encode(params, ids, mask, config=model.config)
  np.testing.assert_allclose(
    enc, t5_model.rms_norm(enc_out[-1], params["encoder"]["final_norm"]["scale"], model.config.layer_norm_epsilon),
    atol=1e-6)
  assert not np.allclose(enc_in, enc_out)


def test_constrained_matrices_match_default_policy(pair):
  _, model = pair
  mats = t5.constrained_matrices(model)
  labels = flatten_with_paths(ParamPolicy().labels(model.params()))
  assert set(mats) == {p for p, a in labels.items() if a == "constrain"}
  c = model.config
  assert mats["decoder/layers/cross_attn/o/weight"] == (3, 32, 32)
  assert mats["encoder/layers/mlp/wo/weight"] == (2, 32, 48)
  ff = ("wi_0", "wi_1") if c.is_gated_act else ("wi",)
  assert {p.split("/")[-2] for p in mats if "/mlp/" in p} == {*ff, "wo"}
  assert len(mats) == (4 + len(ff) + 1) + (8 + len(ff) + 1)


def test_generate_matches_torch_stops_and_compiles_once(gated):
  tm, model = gated
  ids, mask, _, _ = _batch(3)
  with torch.no_grad():
    ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=12, eos_token_id=None, pad_token_id=0,
                      use_cache=False).numpy()[:, 1:]  # transformers 5.24 sizes its cache by num_layers
  ours = np.asarray(t5.generate(model, ids, mask, max_new_tokens=12, eos_token_id=()))
  np.testing.assert_array_equal(ours, ref)
  assert len(set(ours[0].tolist())) > 3, "degenerate test model: greedy output barely varies"
  # An end token in the middle of row 0 stops that row there; the rest of the row is padding.
  eos = int(ours[0, 4])
  first = int(np.argmax(ours[0] == eos))
  stopped = np.asarray(t5.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=7))
  np.testing.assert_array_equal(stopped[0, :first + 1], ours[0, :first + 1])
  assert (stopped[0, first + 1:] == 7).all()
  for row in range(3):
    hits = np.nonzero(ours[row] == eos)[0]
    end = hits[0] + 1 if hits.size else 12
    np.testing.assert_array_equal(stopped[row, :end], ours[row, :end])
  size = t5_decoding.greedy._cache_size()
  t5.generate(model, ids[::-1], mask[::-1], max_new_tokens=12, eos_token_id=eos, pad_token_id=3)
  assert t5_decoding.greedy._cache_size() == size, "a new prompt of the same shape must not recompile"


def test_init_shapes_and_bf16():
  config = t5.config_from_hf({"vocab_size": 40, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2,
                              "num_heads": 2, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
  model = t5.init(config, seed=3, dtype=jnp.bfloat16)
  flat = flatten_with_paths(model.params())
  assert {p: tuple(v.shape) for p, v in flat.items()} == t5_model.flat_shapes(config)
  assert all(v.dtype == jnp.bfloat16 for v in flat.values())
  assert "lm_head/weight" in flat
  logits = model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 3), jnp.int32))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 3, 40) and bool(jnp.isfinite(logits).all())
  with pytest.raises(ValueError, match="lm_head/weight"):
    t5.T5Model(config, {k: v for k, v in model.params().items() if k != "lm_head"})


def test_gradients_match_torch_backward(gated):
  tm, model = gated
  ids, mask, dec, dec_mask = _batch(4)
  labels = np.where(dec_mask == 1, np.roll(dec, -1, axis=1), -100)
  apply_fn, params = t5.functional(model)

  def loss(p):
    logits = apply_fn(p, ids, t5.shift_right(labels, 0, 0), mask, dec_mask)
    valid = labels != -100
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return -(picked * valid).sum() / valid.sum()

  grads = flatten_with_paths(jax.jit(jax.grad(loss))(params))
  assert all(bool(jnp.isfinite(g).all()) for g in grads.values())
  for path in t5.constrained_matrices(model):
    assert float(jnp.abs(grads[path]).max()) > 0, path
  # Training parity: the same masked cross-entropy through torch's autograd, in float64 so that the reference has
  # no rounding of its own; every parameter within float32 reassociation of its gradient's scale (_numerics).
  tm64 = copy.deepcopy(tm).double()
  tm64.zero_grad()
  out = tm64(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
             decoder_attention_mask=torch.tensor(dec_mask))
  out.loss.backward()
  named = dict(tm64.named_parameters())
  checked = 0
  for entry in t5_params.key_map(model.config):
    refs = [named[n].grad for n in entry.hf_names if n in named]
    if len(refs) < len(entry.hf_names):
      continue  # the tied head and the embedding's aliases: shared.weight holds its gradient
    want = np.stack([r.numpy() for r in refs]) if entry.stacked else refs[0].numpy()
    assert_close_at_scale(grads[entry.path], want, ulps=GRAD_ULPS, err_msg=entry.path)
    checked += 1
  assert checked == len(grads)


def test_matrix_input_covariances_match_torch_hooks(gated):
  """The covariance of every constrained matrix's input equals ``sum x x^T`` over the real tokens of what torch's
  corresponding ``nn.Linear`` receives (forward pre-hooks), on two padded batches."""
  tm, model = gated
  batches = []
  for seed in (5, 6):
    ids, mask, dec, dec_mask = _batch(seed)
    batches.append({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                    "decoder_attention_mask": dec_mask})
  covs = t5.matrix_input_covariances(model, batches)
  assert set(covs) == set(t5.constrained_matrices(model))

  want: dict[str, np.ndarray] = {}
  current: dict[str, np.ndarray] = {}

  def hook(path, layer, stack):
    def fn(_module, args):
      x = args[0].detach().numpy().astype(np.float64)
      # Cross-attention k/v read the encoder output: its real tokens are the encoder's.
      tokens = current["enc"] if stack == "encoder" or "/cross_attn/k/" in path or "/cross_attn/v/" in path \
        else current["dec"]
      c = np.einsum("bti,btj->ij", x * tokens[..., None], x * tokens[..., None])
      key = (path, layer)
      want[key] = want.get(key, 0) + c
    return fn

  handles = []
  for stack, blocks in (("encoder", tm.encoder.block), ("decoder", tm.decoder.block)):
    for i, block in enumerate(blocks):
      attns = [("self_attn", block.layer[0].SelfAttention)]
      if stack == "decoder":
        attns.append(("cross_attn", block.layer[1].EncDecAttention))
      for ours, attn in attns:
        for m in ("q", "k", "v", "o"):
          path = f"{stack}/layers/{ours}/{m}/weight"
          handles.append(getattr(attn, m).register_forward_pre_hook(hook(path, i, stack)))
      ff = block.layer[-1].DenseReluDense
      for m in ("wi_0", "wi_1", "wo"):
        handles.append(getattr(ff, m).register_forward_pre_hook(hook(f"{stack}/layers/mlp/{m}/weight", i, stack)))
  try:
    with torch.no_grad():
      for b in batches:
        current.update(enc=b["attention_mask"].astype(np.float64), dec=b["decoder_attention_mask"].astype(np.float64))
        tm(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
           decoder_input_ids=torch.tensor(b["decoder_input_ids"]),
           decoder_attention_mask=torch.tensor(b["decoder_attention_mask"]))
  finally:
    for h in handles:
      h.remove()
  for path, c in covs.items():
    assert c.shape == (c.shape[0], c.shape[1], c.shape[1]) and c.dtype == jnp.float32
    for layer in range(c.shape[0]):
      ref = want[(path, layer)]
      np.testing.assert_allclose(np.asarray(c[layer]), ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max(),
                                 err_msg=f"{path} layer {layer}")
