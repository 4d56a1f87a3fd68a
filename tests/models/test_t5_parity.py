"""T5 through the checkpoint interface: tiny random transformers models saved with ``save_pretrained``, loaded with
``clsvd_jax.models.from_pretrained``: logits, greedy decoding, export back to torch, bf16, bad checkpoints."""

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
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration

from clsvd_jax import models
from clsvd_jax._src.tree_paths import flatten_with_paths

# Tiny models: torch's intra-op threads only spin against JAX's on a small CPU (20x slower generate).
torch.set_num_threads(1)

VOCAB = 112
D_MODEL = 64


def _torch_t5(feed_forward_proj: str, untie: bool, seed: int) -> T5ForConditionalGeneration:
  """A tiny random T5. Block weights and position bias are enlarged so that greedy decoding depends on context."""
  hf = HFT5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=16, relative_attention_max_distance=32,
                  feed_forward_proj=feed_forward_proj, tie_word_embeddings=not untie, decoder_start_token_id=0,
                  eos_token_id=1, pad_token_id=0)
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(hf).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi.weight", "wi_0.weight", "wi_1.weight",
                        "wo.weight")):
        p.mul_(2.0)
      elif "relative_attention_bias" in name:
        p.mul_(10.0)
      elif "layer_norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  if untie:
    # transformers v5 ties T5's head whatever the config says; a distinct lm_head.weight is kept untied on save and
    # load, which is how real v1.1 / flan-t5 checkpoints look.
    model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(VOCAB, D_MODEL))
  return model


VARIANTS = {"v1_0": ("relu", False), "v1_1": ("gated-gelu", True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Both variants saved by transformers: {name: directory}."""
  out = {}
  for name, (ff, untie) in VARIANTS.items():
    path = tmp_path_factory.mktemp(name) / "ckpt"
    _torch_t5(ff, untie, seed=len(name) + (7 if untie else 0)).save_pretrained(path)
    out[name] = path
  return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, checkpoints):
  untie = VARIANTS[request.param][1]
  path = checkpoints[request.param]
  tm = T5ForConditionalGeneration.from_pretrained(path).eval()  # the reference is what the files say
  assert (tm.lm_head.weight.data_ptr() != tm.shared.weight.data_ptr()) == untie
  model = models.from_pretrained(str(path))
  return {"name": request.param, "torch": tm, "model": model, "path": path, "untie": untie}


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, VOCAB, (3, 10))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # right padding, as T5 inputs are padded
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  dec = rng.randint(2, VOCAB, (3, 6))
  dec_mask = np.ones_like(dec)
  dec_mask[0, 4:] = 0
  dec_mask[2, 2:] = 0
  dec[dec_mask == 0] = 0
  return ids, mask, dec, dec_mask


def _torch_logits(tm, ids, mask, dec, dec_mask):
  with torch.no_grad():
    return tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
              decoder_attention_mask=torch.tensor(dec_mask)).logits.float().numpy()


def test_config_and_head(case):
  model = case["model"]
  config = model.config
  assert config.tie_word_embeddings == (not case["untie"])
  assert config.scale_decoder_outputs == (not case["untie"])
  assert config.is_gated_act == case["untie"]
  assert ("lm_head/weight" in flatten_with_paths(model.params())) == case["untie"]
  assert model.dtype == jnp.float32


def test_float32_logits_match_torch_on_padded_batch(case):
  ids, mask, dec, dec_mask = _batch()
  ref = _torch_logits(case["torch"], ids, mask, dec, dec_mask)
  ours = np.asarray(case["model"](ids, dec, mask, dec_mask))
  assert ours.shape == ref.shape == (3, 6, VOCAB)
  assert_close_at_scale(ours, ref, ulps=LOGITS_ULPS)
  # The masks matter: without them the padded rows change (all-ones masks: the same compiled function).
  unmasked = np.asarray(case["model"](ids, dec, np.ones_like(mask), np.ones_like(dec_mask)))
  assert np.abs(unmasked[1:] - ref[1:]).max() > 1e-3


def test_greedy_generate_matches_torch(case):
  tm, model = case["torch"], case["model"]
  ids, mask, _, _ = _batch(1)
  with torch.no_grad():
    ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=20).numpy()[:, 1:]
  ours = np.asarray(models.generate(model, ids, mask, max_new_tokens=20))
  assert ours.shape == (3, 20)
  # transformers stops when every row has ended; the rest of our fixed-size output is padding.
  padded = np.full((3, 20), model.config.pad_token_id)
  padded[:, :ref.shape[1]] = ref
  np.testing.assert_array_equal(ours, padded)
  # Now with an end token taken from the middle of row 0, so that row stops early and the others run on.
  eos = int(ours[0, 5])
  with torch.no_grad():
    ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=20, eos_token_id=eos).numpy()[:, 1:]
  ours = np.asarray(models.generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos))
  padded = np.full((3, 20), model.config.pad_token_id)
  padded[:, :ref.shape[1]] = ref
  np.testing.assert_array_equal(ours, padded)
  assert (ours[0] == eos).any() and ours[0, -1] == model.config.pad_token_id
  if case["untie"]:
    assert len(set(ours[1].tolist())) > 3, "degenerate test model: greedy output barely varies"


def test_save_pretrained_round_trip_through_torch(case, tmp_path):
  model = case["model"]
  out = tmp_path / "export"
  models.save_pretrained(model, str(out))
  back = T5ForConditionalGeneration.from_pretrained(out).eval()
  assert (back.lm_head.weight.data_ptr() != back.shared.weight.data_ptr()) == case["untie"]
  ids, mask, dec, dec_mask = _batch(2)
  ref = _torch_logits(case["torch"], ids, mask, dec, dec_mask)
  assert np.abs(_torch_logits(back, ids, mask, dec, dec_mask) - ref).max() <= 1e-5
  again = models.from_pretrained(str(out))
  assert again.config == model.config
  assert_close_at_scale(np.asarray(again(ids, dec, mask, dec_mask)), ref, ulps=LOGITS_ULPS)


def test_bf16_load(case):
  model = models.from_pretrained(str(case["path"]), dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in flatten_with_paths(model.params()).values())
  ids, mask, dec, dec_mask = _batch()
  ref = np.asarray(case["model"](ids, dec, mask, dec_mask))
  ours = np.asarray(model(ids, dec, mask, dec_mask))
  assert ours.dtype == np.float32 and np.isfinite(ours).all()
  # The yardstick is transformers itself in bf16: our error may not be much larger than its own.
  tb = T5ForConditionalGeneration.from_pretrained(case["path"], dtype=torch.bfloat16).eval()
  torch_err = np.linalg.norm(_torch_logits(tb, ids, mask, dec, dec_mask) - ref) / np.linalg.norm(ref)
  our_err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert our_err <= max(2 * torch_err, 0.02), (our_err, torch_err)
  assert our_err <= 0.1
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


_SHARDED_LOAD = """
import sys
import jax, numpy as np
from clsvd_jax import models
from clsvd_jax.parallel import make_mesh
batch = np.load(sys.argv[1])
ids, mask, dec, dec_mask = (batch[k] for k in ("ids", "mask", "dec", "dec_mask"))
mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
# Rules name the trailing dims (clsvd_jax.parallel.rules); the stacked layer axis stays whole.
rules = [(r"layers/(self_attn|cross_attn)/(q|k|v)/weight$", ("tensor", "fsdp")),
         (r"shared/embedding$", ("tensor", None))]
for i, path in enumerate(sys.argv[2:]):
  model = models.from_pretrained(path, mesh=mesh, partition_rules=rules)
  params = model.params()
  q = params["decoder"]["layers"]["cross_attn"]["q"]["weight"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp"), q.sharding
  assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (2, 32, 32)
  assert params["shared"]["embedding"].sharding.spec[0] == "tensor"
  diff = np.abs(np.asarray(model(ids, dec, mask, dec_mask)) - batch[f"logits{i}"]).max()
  assert diff <= 1e-4, (path, diff)
  gen = np.asarray(models.generate(model, ids, mask, max_new_tokens=8))
  assert (gen == batch[f"tokens{i}"]).all(), (path, gen, batch[f"tokens{i}"])
print("OK")
"""


def test_load_sharded_on_four_cpu_devices(checkpoints, tmp_path):
  ids, mask, dec, dec_mask = _batch()
  expected = {}
  for i, name in enumerate(VARIANTS):  # unsharded results from this process
    model = models.from_pretrained(str(checkpoints[name]))
    expected[f"logits{i}"] = np.asarray(model(ids, dec, mask, dec_mask))
    expected[f"tokens{i}"] = np.asarray(models.generate(model, ids, mask, max_new_tokens=8))
  np.savez(tmp_path / "batch.npz", ids=ids, mask=mask, dec=dec, dec_mask=dec_mask, **expected)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  paths = [str(checkpoints[name]) for name in VARIANTS]
  proc = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path / "batch.npz"), *paths],
                        env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _broken_copy(case, tmp_path, edit):
  bad = tmp_path / "bad"
  shutil.copytree(case["path"], bad)
  tensors = load_file(bad / "model.safetensors")
  edit(tensors)
  save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
  return bad


def test_missing_tensor_names_file_and_tensor(case, tmp_path):
  name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  bad = _broken_copy(case, tmp_path, lambda t: t.pop(name))
  with pytest.raises(Exception, match=r"model\.safetensors|bad") as err:
    models.from_pretrained(str(bad))
  assert name in str(err.value)


def test_wrong_shape_names_file_and_tensor(case, tmp_path):
  name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"

  def edit(t):
    t[name] = np.zeros((D_MODEL, 5), np.float32)

  bad = _broken_copy(case, tmp_path, edit)
  with pytest.raises(Exception, match=r"model\.safetensors|bad") as err:
    models.from_pretrained(str(bad))
  assert name in str(err.value) and "5" in str(err.value)


def test_bad_config_field_names_file(case, tmp_path):
  bad = tmp_path / "badcfg"
  shutil.copytree(case["path"], bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["feed_forward_proj"] = "gated-gelu-x"
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config\.json.*feed_forward_proj"):
    models.from_pretrained(str(bad))


def test_head_as_the_tensors_say(case, tmp_path):
  """Checkpoint variants transformers accepts, loaded by both sides: v4-era files with copies of the embedding
  (``*.embed_tokens.weight``, and ``lm_head.weight`` when tied) and a config saying untied without any
  ``lm_head.weight`` (transformers then ties; we do the same and warn)."""
  ids, mask, dec, dec_mask = _batch()

  def copies(t):
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      t[name] = t["shared.weight"].copy()
    if not case["untie"]:
      t["lm_head.weight"] = t["shared.weight"].copy()

  v4 = _broken_copy(case, tmp_path / "v4", copies)
  model = models.from_pretrained(str(v4))
  assert model.config.tie_word_embeddings == (not case["untie"])
  ref = _torch_logits(T5ForConditionalGeneration.from_pretrained(v4).eval(), ids, mask, dec, dec_mask)
  assert_close_at_scale(np.asarray(model(ids, dec, mask, dec_mask)), ref, ulps=LOGITS_ULPS)

  headless = _broken_copy(case, tmp_path / "headless", lambda t: t.pop("lm_head.weight", None))
  cfg = json.loads((headless / "config.json").read_text())
  cfg["tie_word_embeddings"] = False
  (headless / "config.json").write_text(json.dumps(cfg))
  with pytest.warns(UserWarning, match="lm_head.weight"):
    model = models.from_pretrained(str(headless))
  assert model.config.tie_word_embeddings
  assert model.config.scale_decoder_outputs == cfg["scale_decoder_outputs"]
  ref = _torch_logits(T5ForConditionalGeneration.from_pretrained(headless).eval(), ids, mask, dec, dec_mask)
  # v1.1 made tied and unscaled has logits around 20 (the embedding's scale): float32 rounding grows with them,
  # which the tolerance relative to the logits' scale follows.
  assert_close_at_scale(np.asarray(model(ids, dec, mask, dec_mask)), ref, ulps=LOGITS_ULPS)
