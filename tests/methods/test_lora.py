"""LoRA / O-LoRA: the merged export equals PEFT's unmerged LoRA forward (tiny T5 and tiny LLaMA), the O-LoRA penalty on
known matrices, and finished adapters that receive exactly zero updates."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from clsvd_jax import models
from clsvd_jax.methods import lora
from clsvd_jax.train.step import token_losses

torch.set_num_threads(1)
VOCAB = 64


def _torch_model(family):
  import transformers

  torch.manual_seed(0)
  if family == "llama":
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj"]
  cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                              num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False, decoder_start_token_id=0)
  return transformers.T5ForConditionalGeneration(cfg).eval(), ["q", "v"]


def _inputs(family):
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, (2, 7))
  mask = np.ones_like(ids)
  mask[1, :3] = 0 if family == "llama" else 1
  if family == "t5":
    mask[1, 5:] = 0
  dec = rng.randint(3, VOCAB, (2, 4))
  return ids, mask, dec


def _torch_logits(model, family, ids, mask, dec):
  with torch.no_grad():
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if family == "t5":
      kw["decoder_input_ids"] = torch.tensor(dec)
    return model(**kw).logits.numpy()


@pytest.mark.parametrize("family,slots", [("llama", 2), ("t5", 1)])
def test_merged_export_equals_unmerged_peft_forward(family, slots, tmp_path):
  import peft
  import transformers

  tm, modules = _torch_model(family)
  tm.save_pretrained(tmp_path / "base")
  model = models.from_pretrained(str(tmp_path / "base"))
  apply_fn, base = models.functional(model)
  shapes = lora.target_shapes(models.constrained_matrices(model))
  if family == "t5":  # O-LoRA's q and v, in encoder and decoder self-attention and in cross-attention
    assert sorted(shapes) == [f"decoder/layers/{a}/{m}/weight" for a in ("cross_attn", "self_attn") for m in "qv"] \
        + [f"encoder/layers/self_attn/{m}/weight" for m in "qv"]
  else:
    assert sorted(shapes) == ["layers/self_attn/q_proj/weight", "layers/self_attn/v_proj/weight"]
  opts = lora.LoraOptions(rank=3, alpha=6.0)
  adapters = lora.init_adapters(jax.random.key(1), shapes, rank=opts.rank, slots=slots)
  # Non-zero B (as after training) in every slot.
  adapters = {p: f._replace(b=0.3 * jax.random.normal(jax.random.key(i), f.b.shape))
              for i, (p, f) in enumerate(adapters.items())}

  # The unmerged reference: PEFT's LoRA layers on the torch model (x W^T + scale * (x A^T) B^T). Slots stack into
  # one adapter of rank r * S (sum_s B_s A_s = [B_1 .. B_S] [A_1; ..; A_S]); alpha scales so that PEFT's
  # lora_alpha / (r * S) equals our alpha / r.
  ref = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForSeq2SeqLM
  peft_model = peft.get_peft_model(ref.from_pretrained(tmp_path / "base").eval(),
                                   peft.LoraConfig(r=opts.rank * slots, lora_alpha=opts.alpha * slots,
                                                   target_modules=modules, lora_dropout=0.0)).eval()
  params_mod = importlib.import_module(f"clsvd_jax.models.{family}.params")
  placed = 0
  for entry in params_mod.key_map(model.config):
    if entry.path not in adapters:
      continue
    f = adapters[entry.path]
    for layer, hf_name in enumerate(entry.hf_names):
      layer_mod = peft_model.base_model.model.get_submodule(hf_name.removesuffix(".weight"))
      a = np.concatenate([np.asarray(f.a[s, layer]) for s in range(slots)], axis=0)
      b = np.concatenate([np.asarray(f.b[s, layer]) for s in range(slots)], axis=1)
      with torch.no_grad():
        layer_mod.lora_A["default"].weight.copy_(torch.tensor(a))
        layer_mod.lora_B["default"].weight.copy_(torch.tensor(b))
      placed += 1
  assert placed == sum(len(e.hf_names) for e in params_mod.key_map(model.config) if e.path in adapters)

  ids, mask, dec = _inputs(family)
  unmerged = _torch_logits(peft_model, family, ids, mask, dec)
  base_logits = _torch_logits(tm, family, ids, mask, dec)
  assert np.abs(unmerged - base_logits).max() > 1e-2  # the adapters matter

  lora.export_merged(model, base, adapters, opts.scale, tmp_path / "merged")
  exported = ref.from_pretrained(tmp_path / "merged").eval()  # plain transformers, no PEFT
  merged = _torch_logits(exported, family, ids, mask, dec)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)

  # Our jitted forward on merge(base, adapters) (what the train step computes) agrees with both.
  args = (ids, dec, mask) if family == "t5" else (ids, mask)
  ours = np.asarray(jax.jit(lambda b, a: apply_fn(lora.merge(b, a, opts.scale), *args))(base, adapters))
  real = mask.astype(bool) if family == "llama" else np.ones(dec.shape, bool)  # pad positions carry no meaning
  np.testing.assert_allclose(ours[real], unmerged[real], atol=1e-4, rtol=0)
  reloaded = models.from_pretrained(str(tmp_path / "merged"))
  np.testing.assert_allclose(np.asarray(reloaded(*args)), ours, atol=1e-5, rtol=0)


def _known_adapters():
  # Two layers, rank 2, n = 3, three slots; slot 2 is the active one.
  a = np.zeros((3, 2, 2, 3), np.float32)
  a[0, 0] = [[1, 0, 0], [0, 1, 0]]
  a[0, 1] = [[1, 1, 0], [0, 0, 0]]
  a[1, 0] = [[0, 0, 2], [1, 0, 0]]
  a[1, 1] = [[0, 0, 0], [0, 0, 1]]
  a[2, 0] = [[1, -1, 1], [0, 2, 0]]
  a[2, 1] = [[3, 0, 0], [0, 1, -1]]
  b = np.zeros((3, 2, 4, 2), np.float32)
  b[2, 0] = [[3, 0], [0, 0], [0, 4], [0, 0]]  # ||B_2 of layer 0|| = 5
  return {"layers/q/weight": lora.LoraFactors(jnp.asarray(a), jnp.asarray(b))}


def test_olora_penalty_on_known_matrices():
  adapters = _known_adapters()
  # By hand: |A_i A_2^T| summed over entries, i = 0, 1, for each layer.
  # layer 0: A_0 A_2^T = [[1, 0], [-1, 2]] -> 4; A_1 A_2^T = [[2, 0], [1, 0]] -> 3
  # layer 1: A_0 A_2^T = [[3, 1], [0, 0]] -> 4; A_1 A_2^T = [[0, 0], [0, -1]] -> 1
  orth = 4 + 3 + 4 + 1
  sq = (1 + 1 + 4) + (4 + 1) + (9 + 1) + 1
  norms = np.sqrt(7) + np.sqrt(11) + 5 + 0  # ||A_2|| of each layer, ||B_2|| of each layer
  opts = lora.LoraOptions(lambda1=0.5, lambda2=0.1)

  @jax.jit
  def values(ad):
    return (lora.orthogonality_penalty(ad, 2), lora.orthogonality_penalty(ad, 2, kind="squared"),
            lora.orthogonality_penalty(ad, 0), lora.orthogonality_penalty(ad, 1), lora.norm_penalty(ad, 2),
            lora.olora_penalty(ad, 2, opts), jax.grad(lambda x: lora.olora_penalty(x, 2, opts))(ad))

  got_orth, got_sq, first, second, got_norms, total, grads = values(adapters)
  assert float(got_orth) == pytest.approx(orth) and float(got_sq) == pytest.approx(sq)
  assert float(first) == 0.0  # the first task has nothing to be orthogonal to
  # Slot 1 against slot 0 only: layer 0 A_0 A_1^T = [[0, 1], [0, 0]] -> 1, layer 1 -> 0.
  assert float(second) == pytest.approx(1.0)
  assert float(got_norms) == pytest.approx(norms, rel=1e-6)
  assert float(total) == pytest.approx(0.5 * orth + 0.1 * norms, rel=1e-6)
  # The gradient is finite where B is zero (a fresh adapter), and old slots get none.
  g = grads["layers/q/weight"]
  assert np.all(np.isfinite(np.asarray(g.a))) and np.all(np.isfinite(np.asarray(g.b)))
  assert not np.any(np.asarray(g.a[:2])) and not np.any(np.asarray(g.b[:2]))
  assert not np.any(np.asarray(g.b[2, 1]))  # ||0|| has gradient 0 (torch's convention), not NaN


def test_finished_adapters_get_zero_updates():
  model = models.init_from_config(dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), seed=0)
  apply_fn, base = models.functional(model)
  opts = lora.LoraOptions(rank=2, alpha=4.0, lambda1=0.5, lambda2=0.01)
  adapters = lora.init_adapters(jax.random.key(0), lora.target_shapes(models.constrained_matrices(model)),
                                rank=opts.rank, slots=3)
  tx = lora.only_active_slot(optax.adamw(3e-2, weight_decay=0.1), active=0)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, (4, 9)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
  traces = []

  @jax.jit
  def step(adapters, opt_state):
    traces.append(1)

    def loss(ad):
      total, count = token_losses(apply_fn, lora.merge(base, ad, opts.scale), batch, "decoder")
      return total / count + lora.olora_penalty(ad, opt_state.active, opts)

    grads = jax.grad(loss)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  state = tx.init(adapters)
  snapshots = [adapters]
  for slot in range(3):
    state = lora.set_active_slot(state, slot)
    for _ in range(3):
      adapters, state = step(adapters, state)
    snapshots.append(adapters)
  assert len(traces) == 1  # switching slots is data: one compilation
  for slot in range(3):
    before, after = snapshots[slot], snapshots[slot + 1]
    for path in adapters:
      for field in ("a", "b"):
        x, y = np.asarray(getattr(before[path], field)), np.asarray(getattr(after[path], field))
        for s in range(3):
          if s == slot:
            assert np.abs(y[s] - x[s]).max() > 1e-4, (slot, path, field)
          else:
            # Finished slots keep nonzero Adam moments and weight decay, yet move by exactly nothing.
            np.testing.assert_array_equal(y[s], x[s], err_msg=f"slot {s} moved while training slot {slot}")
  with pytest.raises(ValueError, match="only_active_slot"):
    lora.set_active_slot(optax.adam(1.0).init(adapters), 1)


def test_target_and_shape_errors():
  with pytest.raises(ValueError, match="match none"):
    lora.target_shapes({"layers/mlp/up/weight": (2, 4, 4)})
  adapters = lora.init_adapters(jax.random.key(0), {"w": (3, 5)}, rank=2)
  with pytest.raises(ValueError, match="does not have"):
    lora.merge({"v": jnp.zeros((3, 5))}, adapters, 1.0)
  with pytest.raises(ValueError, match="shape"):
    lora.merge({"w": jnp.zeros((5, 3))}, adapters, 1.0)
  with pytest.raises(ValueError, match="rank"):
    lora.LoraOptions(rank=0)
