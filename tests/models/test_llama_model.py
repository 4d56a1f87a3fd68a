"""LLaMA model internals without checkpoints: config parsing (v4 / v5 rotary forms), rotary frequencies against
transformers, the functional interface, block hidden states, constrained matrices, input covariances, decoding
invariants (KV cache == full recompute, left padding == no padding) and argument errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _numerics import GRAD_ULPS, assert_close_at_scale

from clsvd_jax import models
from clsvd_jax._src.tree_paths import flatten_with_paths
from clsvd_jax.models import llama
from clsvd_jax.models.llama import model as llama_model

HF = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, eos_token_id=2, bos_token_id=1)


@pytest.fixture(scope="module")
def model():
  return models.init_from_config(HF, seed=0)


def _ids(seed=0, batch=2, length=7):
  return np.random.RandomState(seed).randint(3, HF["vocab_size"], (batch, length)).astype(np.int32)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


def test_config_v4_and_v5_rotary_forms_agree():
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  v4 = llama.config_from_hf({**HF, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
  v4_old = llama.config_from_hf({**HF, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
  v5 = llama.config_from_hf({**HF, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
  assert v4 == v4_old == v5
  assert v5.rope_scaling == llama.RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and v5.rope_theta == 5e5
  assert llama.config_from_hf(llama.config_to_hf(v5)) == v5
  plain = llama.config_from_hf({**HF, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
  assert plain.rope_scaling is None and plain.head_dim == 8 and plain.num_groups == 2
  # Defaults: no kv heads -> multi-head attention; head_dim from hidden / heads; unknown keys carried through.
  mha = llama.config_from_hf({**{k: v for k, v in HF.items() if k != "num_key_value_heads"}, "my_key": 3})
  assert mha.num_key_value_heads == 4 and llama.config_to_hf(mha)["my_key"] == 3


@pytest.mark.parametrize("rope", [
  None,
  {"rope_type": "linear", "factor": 4.0},
  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
   "original_max_position_embeddings": 64},
])
def test_rope_inv_freq_matches_transformers(rope):
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

  kw = dict(vocab_size=96, hidden_size=256, num_attention_heads=2, rope_theta=5e5, max_position_embeddings=64)
  hf = LlamaConfig(**kw, rope_scaling=rope) if rope else LlamaConfig(**kw)
  ref = LlamaRotaryEmbedding(hf).inv_freq.numpy()
  ours = llama_model.rope_inv_freq(llama.config_from_hf(hf.to_dict()))
  assert ours.dtype == np.float32 and ours.shape == ref.shape == (64,)
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=0)
  if rope and rope["rope_type"] == "llama3":
    # The scaling acts on part of the band only: high frequencies kept, low ones divided by the factor.
    plain = llama_model.rope_inv_freq(dataclasses.replace(llama.config_from_hf(hf.to_dict()), rope_scaling=None))
    assert ours[0] == plain[0] and np.isclose(ours[-1], plain[-1] / 8)


@pytest.mark.parametrize("edit, pattern", [
  ({"hidden_act": "tanh"}, r"src\.json: .*'hidden_act' is 'tanh'"),
  ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"src\.json: field 'rope_scaling' of rope_type "
   r"'llama3' lacks 'low_freq_factor'"),
  ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"src\.json: .*'dynamic'"),
  ({"num_hidden_layers": 0}, r"src\.json: .*'num_hidden_layers' must be a positive integer"),
  ({"head_dim": 7}, r"src\.json: .*'head_dim' must be even"),
  ({"model_type": "t5"}, r"src\.json: model_type is 't5'"),
])
def test_config_errors_name_source_and_field(edit, pattern):
  with pytest.raises(ValueError, match=pattern):
    llama.config_from_hf({**HF, **edit}, source="src.json")


def test_init_from_config_accepts_dict_or_config():
  config = llama.config_from_hf(HF)
  a = models.init_from_config(config, seed=1)
  b = models.init_from_config(HF, seed=1)
  for (pa, x), (pb, y) in zip(flatten_with_paths(a.params()).items(), flatten_with_paths(b.params()).items()):
    assert pa == pb and np.array_equal(x, y)
  bf = models.init_from_config(HF, seed=1, dtype=jnp.bfloat16)
  assert bf.dtype == jnp.bfloat16
  std = np.std(np.asarray(flatten_with_paths(a.params())["layers/mlp/up_proj/weight"]))
  assert 0.15 < std < 0.25  # initializer_range from the dict
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    models.init_from_config({**HF, "model_type": "gpt2"})
  with pytest.raises(TypeError, match="init_from_config"):
    models.init_from_config(object())


# --------------------------------------------------------------------------------------------------------------------
# Functional interface, hidden states, constrained matrices
# --------------------------------------------------------------------------------------------------------------------


def test_param_paths_are_the_contract(model):
  c = model.config
  hd, kv = c.head_dim, c.num_key_value_heads
  assert {p: tuple(v.shape) for p, v in flatten_with_paths(model.params()).items()} == {
    "embed_tokens/embedding": (96, 32),
    "layers/input_layernorm/scale": (3, 32),
    "layers/self_attn/q_proj/weight": (3, 4 * hd, 32),
    "layers/self_attn/k_proj/weight": (3, kv * hd, 32),
    "layers/self_attn/v_proj/weight": (3, kv * hd, 32),
    "layers/self_attn/o_proj/weight": (3, 32, 4 * hd),
    "layers/post_attention_layernorm/scale": (3, 32),
    "layers/mlp/gate_proj/weight": (3, 48, 32),
    "layers/mlp/up_proj/weight": (3, 48, 32),
    "layers/mlp/down_proj/weight": (3, 32, 48),
    "norm/scale": (32,),
    "lm_head/weight": (96, 32),
  }
  assert models.constrained_matrices(model) == {
    "layers/self_attn/q_proj/weight": (3, 32, 32), "layers/self_attn/k_proj/weight": (3, 16, 32),
    "layers/self_attn/v_proj/weight": (3, 16, 32), "layers/self_attn/o_proj/weight": (3, 32, 32),
    "layers/mlp/gate_proj/weight": (3, 48, 32), "layers/mlp/up_proj/weight": (3, 48, 32),
    "layers/mlp/down_proj/weight": (3, 32, 48)}


def test_functional_and_update_model_round_trip():
  model = models.init_from_config(HF, seed=0)
  ids = _ids()
  mask = np.ones_like(ids)
  apply_fn, params = models.functional(model)
  ref = np.asarray(model(ids, mask))
  np.testing.assert_array_equal(np.asarray(jax.jit(apply_fn)(params, ids, mask)), ref)
  # A changed copy written back changes the model; the original params dict is untouched.
  new = jax.tree.map(lambda x: x, params)
  new["layers"]["mlp"]["down_proj"]["weight"] = 2 * params["layers"]["mlp"]["down_proj"]["weight"]
  models.update_model(model, new)
  np.testing.assert_array_equal(np.asarray(model.params()["layers"]["mlp"]["down_proj"]["weight"]),
                                np.asarray(new["layers"]["mlp"]["down_proj"]["weight"]))
  changed = np.asarray(model(ids, mask))
  assert np.abs(changed - ref).max() > 1e-3
  np.testing.assert_allclose(changed, np.asarray(apply_fn(new, ids, mask)), atol=1e-5)
  bad = jax.tree.map(lambda x: x, new)
  bad["layers"]["mlp"]["up_proj"]["weight"] = jnp.zeros((3, 48, 31))
  with pytest.raises(ValueError, match=r"'layers/mlp/up_proj/weight' has shape \(3, 48, 31\), expected"):
    models.update_model(model, bad)
  del bad["layers"]["mlp"]["up_proj"]
  with pytest.raises(ValueError, match="lack 'layers/mlp/up_proj/weight'"):
    models.update_model(model, bad)


def test_block_hidden_states_chain(model):
  ids = _ids(1)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  states = models.block_hidden_states(model, ids, mask)
  assert list(states) == ["layers"]
  ins, outs = states["layers"]
  assert ins.shape == outs.shape == (3, 2, 7, 32)
  np.testing.assert_array_equal(np.asarray(ins[1:]), np.asarray(outs[:-1]))  # output l == input l + 1
  emb = np.asarray(model.params()["embed_tokens"]["embedding"])[ids]
  np.testing.assert_array_equal(np.asarray(ins[0]), emb)
  # The final norm of the last block's output and the head give the model's logits.
  p = model.params()
  hidden = llama_model.rms_norm(outs[-1], p["norm"]["scale"], model.config.rms_norm_eps)
  np.testing.assert_allclose(np.asarray(llama_model.lm_logits(p, hidden, model.config)), np.asarray(model(ids, mask)),
                             atol=1e-5)


def test_matrix_input_covariances(model):
  ids = _ids(2)
  mask = np.ones_like(ids)
  mask[0, :3] = 0
  covs = llama.matrix_input_covariances(model, [{"input_ids": ids, "attention_mask": mask}] * 2)
  shapes = models.constrained_matrices(model)
  assert set(covs) == set(shapes)
  for path, c in covs.items():
    n_in = shapes[path][-1]
    assert c.shape == (3, n_in, n_in)
  # q/k/v read the normed block input: check against block_hidden_states, over real tokens, twice (two batches).
  ins, _ = models.block_hidden_states(model, ids, mask)["layers"]
  scale = model.params()["layers"]["input_layernorm"]["scale"]
  x = np.asarray(jax.vmap(lambda h, s: llama_model.rms_norm(h, s, model.config.rms_norm_eps))(ins, scale))
  x = x * mask[None, :, :, None]
  expect = 2 * np.einsum("lbti,lbtj->lij", x, x)
  np.testing.assert_allclose(np.asarray(covs["layers/self_attn/k_proj/weight"]), expect, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------


def _recompute_greedy(model, ids, n):
  """Greedy decoding without a cache: the full forward pass for every new token (one row, no padding). The buffer
  has a fixed length (one compilation); causal attention keeps the zeros after the sequence from mattering."""
  buf = np.zeros((1, len(ids) + n), np.int32)
  buf[0, :len(ids)] = ids
  for t in range(len(ids), len(ids) + n):
    buf[0, t] = int(np.argmax(np.asarray(model(buf))[0, t - 1]))
  return buf[0, len(ids):].tolist()


def test_generate_kv_cache_equals_recompute_and_left_padding_is_neutral(model):
  ids = _ids(3, batch=2, length=6)
  n = 6
  # No end ids: run all n steps.
  free = np.asarray(models.generate(model, ids, max_new_tokens=n, eos_token_id=[]))
  assert free.shape == (2, n)
  for row in range(2):
    assert free[row].tolist() == _recompute_greedy(model, ids[row].tolist(), n)
  # Row 1 shortened and left-padded: the same tokens as that prompt alone.
  padded = ids.copy()
  padded[1, :2] = 0
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  out = np.asarray(models.generate(model, padded, mask, max_new_tokens=n, eos_token_id=[]))
  np.testing.assert_array_equal(out[0], free[0])
  alone = np.asarray(models.generate(model, ids[1:, 2:], max_new_tokens=n, eos_token_id=[]))
  np.testing.assert_array_equal(out[1], alone[0])


def test_generate_argument_errors(model):
  ids = _ids()
  with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
    models.generate(model, ids, max_new_tokens=0)
  with pytest.raises(ValueError, match="input_ids must be"):
    models.generate(model, ids[0], max_new_tokens=2)
  mask = np.ones_like(ids)
  mask[0, -2:] = 0
  with pytest.raises(ValueError, match="LEFT-padded"):
    models.generate(model, ids, mask, max_new_tokens=2)
  with pytest.raises(ValueError, match="attention_mask shape"):
    models.generate(model, ids, mask[:, 1:], max_new_tokens=2)


def test_family_dispatch_errors():
  class NotAModel:
    config = None

  with pytest.raises(TypeError, match="not a clsvd_jax model"):
    models.functional(NotAModel())


def test_gradients_match_torch():
  """The training path: gradients of a masked next-token loss through our pure apply equal torch's backward (in
  float64, so that the reference has no rounding of its own), within float32 reassociation of each gradient's
  scale (_numerics)."""
  from transformers import LlamaConfig, LlamaForCausalLM

  from clsvd_jax.models.llama import params as llama_params

  hf = LlamaConfig(**{k: v for k, v in HF.items() if k != "model_type"}, tie_word_embeddings=True)
  torch.manual_seed(0)
  tm = LlamaForCausalLM(hf).float()
  ours = models.init_from_config({**HF, "tie_word_embeddings": True})
  sd = tm.state_dict()
  models.update_model(ours, llama_model.unflatten(llama_params.from_hf(ours.config, lambda n: jnp.asarray(sd[n]))))
  tm = tm.double()
  ids = _ids(4, batch=2, length=8)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
  logits = tm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits
  logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0]
  weights = torch.tensor(mask[:, 1:] * mask[:, :-1], dtype=torch.float64)
  (-(logp * weights).sum() / weights.sum()).backward()

  apply_fn, params = models.functional(ours)

  def loss(p):
    lg = apply_fn(p, ids, mask)
    lp = jnp.take_along_axis(jax.nn.log_softmax(lg[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    w = jnp.asarray(mask[:, 1:] * mask[:, :-1], jnp.float32)
    return -(lp * w).sum() / w.sum()

  grads = flatten_with_paths(jax.grad(loss)(params))
  named = dict(tm.named_parameters())
  assert set(grads) == {e.path for e in llama_params.key_map(ours.config)}
  for entry in llama_params.key_map(ours.config):
    ref = np.stack([named[n].grad.numpy() for n in entry.hf_names]) if entry.stacked else \
        named[entry.hf_names[0]].grad.numpy()
    assert float(np.abs(ref).max()) > 0, entry.path
    assert_close_at_scale(grads[entry.path], ref, ulps=GRAD_ULPS, err_msg=entry.path)


def test_matrix_input_covariances_match_torch_hooks():
  """Every constrained matrix's covariance equals ``sum x x^T`` over the real tokens of what torch's ``nn.Linear``
  of that matrix receives (forward pre-hooks), on two left-padded batches: the block's taps cover o_proj (the
  attention heads) and down_proj (the gated hidden) too, not only the normed inputs."""
  from transformers import LlamaConfig, LlamaForCausalLM

  from clsvd_jax.models.llama import params as llama_params

  hf = LlamaConfig(**{k: v for k, v in HF.items() if k != "model_type"})
  torch.manual_seed(1)
  tm = LlamaForCausalLM(hf).float().eval()
  ours = models.init_from_config(HF)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  models.update_model(ours, llama_model.unflatten(llama_params.from_hf(ours.config, lambda n: jnp.asarray(sd[n]))))
  batches = []
  for seed in (5, 6):
    ids = _ids(seed, batch=3, length=7)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    batches.append({"input_ids": ids, "attention_mask": mask})
  covs = models.matrix_input_covariances(ours, batches)
  assert set(covs) == set(models.constrained_matrices(ours))

  want: dict[tuple[str, int], np.ndarray] = {}
  tokens: dict[str, np.ndarray] = {}

  def hook(path, layer):
    def fn(_module, args):
      x = args[0].detach().numpy().astype(np.float64) * tokens["mask"][..., None]
      want[(path, layer)] = want.get((path, layer), 0) + np.einsum("bti,btj->ij", x, x)
    return fn

  handles = []
  for i, layer in enumerate(tm.model.layers):
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
      for name in names:
        module = getattr(getattr(layer, group), name)
        handles.append(module.register_forward_pre_hook(hook(f"layers/{group}/{name}/weight", i)))
  try:
    with torch.no_grad():
      for b in batches:
        mask = b["attention_mask"]
        tokens["mask"] = mask.astype(np.float64)
        pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
        tm(input_ids=torch.tensor(b["input_ids"], dtype=torch.long), attention_mask=torch.tensor(mask),
           position_ids=torch.tensor(pos))
  finally:
    for h in handles:
      h.remove()
  for path, c in covs.items():
    for layer in range(c.shape[0]):
      ref = want[(path, layer)]
      np.testing.assert_allclose(np.asarray(c[layer]), ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max(),
                                 err_msg=f"{path} layer {layer}")
