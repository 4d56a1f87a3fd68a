"""LLaMA through the checkpoint interface: tiny random transformers models saved with ``save_pretrained``, loaded
with ``clsvd_jax.models.from_pretrained``: logits on left-padded batches, greedy decoding, export back to torch,
bf16, bad checkpoints, hub ids offline."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _numerics import LOGITS_ULPS, assert_close_at_scale
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from clsvd_jax import models
from clsvd_jax._src.tree_paths import flatten_with_paths

VOCAB = 128
PROMPT = 12
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# name -> (config overrides, torch save_pretrained max_shard_size)
CASES = {
  # Grouped-query attention (4 query heads over 2 key/value heads), untied head, default rope.
  "gqa_untied": (dict(num_key_value_heads=2, tie_word_embeddings=False), None),
  # llama3 rope scaling (a short original context so the scaling acts within the test's positions), tied head,
  # explicit head_dim != hidden / heads, attention and MLP biases, a pad id in the config.
  "llama3_tied": (dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=24, attention_bias=True,
                       mlp_bias=True, rope_theta=500000.0, rope_scaling=LLAMA3, pad_token_id=0), None),
  # The first config again (same compiled functions), saved by transformers in several shards with an index.
  "sharded": (dict(num_key_value_heads=2, tie_word_embeddings=False), "30KB"),
}


def _torch_llama(overrides: dict, seed: int) -> LlamaForCausalLM:
  hf = HFLlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-5,
                     bos_token_id=1, eos_token_id=2, **overrides)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(hf).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Non-trivial norms and biases, so that their layout and dtype handling are exercised.
      if name.endswith(("q_proj.weight", "k_proj.weight")):
        p.mul_(3.0)  # sharper attention: greedy output then depends on the context instead of repeating a token
      elif name.endswith("norm.weight"):
        p.add_(0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  overrides, shard = CASES[request.param]
  tm = _torch_llama(overrides, seed=len(request.param))
  path = tmp_path_factory.mktemp(request.param) / "ckpt"
  tm.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
  assert (path / "model.safetensors.index.json").exists() == bool(shard)
  tm = LlamaForCausalLM.from_pretrained(path).eval()  # the reference is what the files say
  model = models.from_pretrained(str(path))
  return {"name": request.param, "torch": tm, "model": model, "path": path,
          "tied": overrides["tie_word_embeddings"]}


def _batch(seed=0):
  """A left-padded batch: row 0 full, rows 1 and 2 with 4 and 7 pads."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, (3, PROMPT))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  mask[2, :7] = 0
  ids[mask == 0] = 0
  return ids, mask


def _torch_logits(tm, ids, mask):
  # transformers' forward counts positions from the left edge; generate uses cumsum(mask) - 1. Give it the latter,
  # which is what our model does by default with a mask.
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.float().numpy()


def test_config_and_params(case):
  model, config = case["model"], case["model"].config
  hf = case["torch"].config
  assert config.tie_word_embeddings == case["tied"]
  assert ("lm_head/weight" in flatten_with_paths(model.params())) == (not case["tied"])
  assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
      hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
  assert (config.rope_scaling is not None) == (case["name"] == "llama3_tied")
  assert model.dtype == jnp.float32
  shapes = {p: tuple(v.shape) for p, v in flatten_with_paths(model.params()).items()}
  assert shapes["layers/self_attn/k_proj/weight"] == (2, hf.num_key_value_heads * hf.head_dim, 64)
  assert shapes["layers/self_attn/o_proj/weight"] == (2, 64, 4 * hf.head_dim)
  # Every torch parameter is somewhere in ours (stacked per layer).
  n_torch = sum(p.numel() for p in case["torch"].parameters())
  assert sum(int(np.prod(s)) for s in shapes.values()) == n_torch


def test_float32_logits_match_torch_on_left_padded_batch(case):
  ids, mask = _batch()
  ref = _torch_logits(case["torch"], ids, mask)
  ours = np.asarray(case["model"](ids, mask))
  assert ours.shape == ref.shape == (3, PROMPT, VOCAB)
  real = mask > 0
  assert_close_at_scale(ours, ref, ulps=LOGITS_ULPS, where=real)
  assert np.isfinite(ours).all()  # pad queries see no key: finite garbage, not NaN
  # Without a mask the padded rows change (same compiled function: the mask is an array argument).
  unmasked = np.asarray(case["model"](ids, np.ones_like(mask)))
  assert np.abs(unmasked[1:] - ref[1:])[real[1:]].max() > 1e-3
  # Row 0 has no padding: it must not depend on the other rows.
  assert_close_at_scale(unmasked[0], ref[0], ulps=LOGITS_ULPS)


def _padded(ref, n, pad):
  out = np.full((ref.shape[0], n), pad)
  out[:, :ref.shape[1]] = ref
  return out


def test_greedy_generate_matches_torch(case):
  tm, model = case["torch"], case["model"]
  ids, mask = _batch(1)
  pad = model.config.pad_token_id if model.config.pad_token_id is not None else 2  # our default: the first eos
  with torch.no_grad():
    ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=20, pad_token_id=pad).numpy()[:, PROMPT:]
  ours = np.asarray(models.generate(model, ids, mask, max_new_tokens=20))
  assert ours.shape == (3, 20) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, _padded(ref, 20, pad))
  assert len(set(ours[0].tolist())) > 3, "degenerate test model: greedy output barely varies"
  # Now with an end token taken from the middle of row 0, so that row stops early and the others run on.
  eos = int(ours[0, 6])
  with torch.no_grad():
    ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=20, eos_token_id=eos, pad_token_id=pad).numpy()[:, PROMPT:]
  ours = np.asarray(models.generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad))
  np.testing.assert_array_equal(ours, _padded(ref, 20, pad))
  stop = int(np.argmax(ours[0] == eos))
  assert stop <= 6 and (ours[0, stop + 1:] == pad).all()


def test_generate_stops_when_every_row_ended(case):
  # Every row's first new token as its own end id: all rows stop at once, the rest is padding.
  model = case["model"]
  ids, mask = _batch(1)
  first = np.asarray(models.generate(model, ids, mask, max_new_tokens=20))[:, 0]
  ours = np.asarray(models.generate(model, ids, mask, max_new_tokens=20, eos_token_id=first.tolist(),
                                    pad_token_id=VOCAB - 1))
  np.testing.assert_array_equal(ours[:, 0], first)
  assert (ours[:, 1:] == VOCAB - 1).all()


def test_save_pretrained_round_trip_through_torch(case, tmp_path):
  model = case["model"]
  out = tmp_path / "export"
  shard = "20KB" if case["name"] == "sharded" else None
  files = models.save_pretrained(model, str(out), max_shard_size=shard)
  assert (len(files) > 1) == bool(shard) and (out / "model.safetensors.index.json").exists() == bool(shard)
  back = LlamaForCausalLM.from_pretrained(out).eval()
  assert (back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()) == case["tied"]
  ids, mask = _batch(2)
  ref = _torch_logits(case["torch"], ids, mask)
  assert np.abs(_torch_logits(back, ids, mask) - ref).max() <= 1e-5
  again = models.from_pretrained(str(out))
  assert again.config == model.config
  assert_close_at_scale(np.asarray(again(ids, mask)), ref, ulps=LOGITS_ULPS, where=mask > 0)


def test_bf16_load(case):
  model = models.from_pretrained(str(case["path"]), dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in flatten_with_paths(model.params()).values())
  ids, mask = _batch()
  real = mask > 0
  ref = np.asarray(case["model"](ids, mask))[real]
  ours = np.asarray(model(ids, mask))
  assert ours.dtype == np.float32 and np.isfinite(ours).all()
  ours = ours[real]
  # The yardstick is transformers itself in bf16: our error may not be much larger than its own.
  tb = LlamaForCausalLM.from_pretrained(case["path"], dtype=torch.bfloat16).eval()
  torch_err = np.linalg.norm(_torch_logits(tb, ids, mask)[real] - ref) / np.linalg.norm(ref)
  our_err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert our_err <= max(2 * torch_err, 0.02), (our_err, torch_err)
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_path(tmp_path_factory):
  """One valid checkpoint (untied, GQA) to break in different ways."""
  path = tmp_path_factory.mktemp("good") / "ckpt"
  _torch_llama(CASES["gqa_untied"][0], seed=3).save_pretrained(path)
  return path


def _broken_copy(good_path, tmp_path, edit):
  bad = tmp_path / "bad"
  shutil.copytree(good_path, bad)
  tensors = load_file(bad / "model.safetensors")
  edit(tensors)
  save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
  return bad


def test_missing_tensor_names_file_and_tensor(good_path, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  bad = _broken_copy(good_path, tmp_path, lambda t: t.pop(name))
  with pytest.raises(models.MissingTensorError) as err:
    models.from_pretrained(str(bad))
  assert name in str(err.value) and str(bad / "model.safetensors") in str(err.value)


def test_wrong_shape_names_file_and_tensor(good_path, tmp_path):
  name = "model.layers.0.self_attn.k_proj.weight"

  def edit(t):
    t[name] = np.zeros((24, 64), np.float32)

  bad = _broken_copy(good_path, tmp_path, edit)
  with pytest.raises(models.CheckpointError, match=r"\[24, 64\].*\[32, 64\]") as err:
    models.from_pretrained(str(bad))
  assert name in str(err.value) and str(bad / "model.safetensors") in str(err.value)


def test_missing_untied_head_is_an_error(good_path, tmp_path):
  bad = _broken_copy(good_path, tmp_path, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(models.MissingTensorError, match="lm_head.weight"):
    models.from_pretrained(str(bad))


def test_directory_without_config(good_path, tmp_path):
  bad = tmp_path / "noconfig"
  shutil.copytree(good_path, bad)
  (bad / "config.json").unlink()
  with pytest.raises(models.CheckpointError, match=r"noconfig/config\.json: missing"):
    models.from_pretrained(str(bad))


@pytest.mark.parametrize("edit, pattern", [
  (lambda c: c.update(model_type="gpt2"), r"config\.json: model_type 'gpt2' is not supported.*llama, t5"),
  (lambda c: c.pop("model_type"), r"config\.json: model_type None is not supported.*llama"),
  (lambda c: c.pop("hidden_size"), r"config\.json: LLaMA config lacks the field 'hidden_size'"),
  (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
   r"config\.json: field 'rope_parameters.rope_type' is 'yarn'; supported rotary types: default, linear, llama3"),
  (lambda c: c.update(num_key_value_heads=3), r"config\.json: .*num_attention_heads=4 is not a multiple of "
   r"num_key_value_heads=3"),
])
def test_bad_config(good_path, tmp_path, edit, pattern):
  bad = tmp_path / "badcfg"
  shutil.copytree(good_path, bad)
  cfg = json.loads((bad / "config.json").read_text())
  edit(cfg)
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=pattern):
    models.from_pretrained(str(bad))


def test_hub_id_offline_names_the_id(tmp_path):
  code = ("from clsvd_jax import models\n"
          "try:\n  models.from_pretrained('no-such-org/no-such-llama')\n"
          "except models.HubError as e:\n  print('ERR', e)\n")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "ERR" in proc.stdout and "'no-such-org/no-such-llama'" in proc.stdout
  assert "local checkpoint directory" in proc.stdout
  with pytest.raises(models.HubError, match="no such checkpoint directory"):
    models.from_pretrained(str(tmp_path / "not-there"))
