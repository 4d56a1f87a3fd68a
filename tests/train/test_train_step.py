"""The jitted train step: loss on targets only, accumulation equals the full batch, bf16 compute, frozen leaves,
the non-finite guard, and the constraint inside the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import clsvd_jax as cj
from clsvd_jax.config import OptimizerConfig, OsftConfig
from clsvd_jax.data import BatchIterator, encode_examples, load_task, tokenizer_info
from clsvd_jax.data.tasks import TaskSpec
from clsvd_jax.models import t5
from clsvd_jax.train import model_io
from clsvd_jax.train import step as step_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("step")
  cfg = t5.config_from_hf({"model_type": "t5", "vocab_size": 384, "d_model": 16, "d_kv": 4, "d_ff": 16,
                           "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4, "tie_word_embeddings": False})
  model = t5.init(cfg, seed=3)
  tok = transformers.ByT5Tokenizer()
  data = load_task(TaskSpec(name="high", source="synthetic", path=str(tmp / "data"), max_train=8))
  split = encode_examples(data.task, data.train, tok, kind="encoder_decoder", max_length=128, max_target_length=8)
  batch = BatchIterator(split, tokenizer_info(tok, "encoder_decoder"), batch_size=4, seed=0).batch_at(0, 0)
  apply_fn, params = model_io.functional(model)
  osft = OsftConfig()
  labels = step_lib.param_policy(osft.param_policy).labels(params)
  trainable = jax.tree.map(lambda a: a != "freeze", labels)
  device_batch = jax.device_put({k: np.asarray(batch[k]) for k in step_lib.TRAIN_KEYS["encoder_decoder"]})
  return apply_fn, params, device_batch, osft, trainable


_STEPS = {}


def _run(setup, *, accum=1, bf16=False, lr=1e-3, constrained=False, batch=None, ranks=None):
  apply_fn, params, b, osft, trainable = setup
  key = (accum, bf16, constrained, str(lr))
  if key not in _STEPS:
    tx = step_lib.build_optimizer(OptimizerConfig(grad_accum=accum), osft, constrained=constrained)
    _STEPS[key] = tx, jax.jit(step_lib.make_train_step(apply_fn, tx, kind="encoder_decoder", grad_accum=accum,
                                                       bf16_compute=bf16, clip_norm=None, trainable=trainable,
                                                       schedule=optax.constant_schedule(lr)))
  tx, step = _STEPS[key]
  state = tx.init(params)
  if ranks is not None:
    subs = cj.compute_subspaces(params, ranks, previous=cj.get_subspaces(state))
    state = cj.set_subspaces(state, subs)
  new_params, new_state, _, m = step(params, state, batch if batch is not None else b, _carry(0))
  return new_params, new_state, m


def _carry(step, first_bad=-1):
  return step_lib.StepCarry(jnp.int32(step), jnp.int32(first_bad))


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_accumulation_equals_the_full_batch(setup):
  p1, _, m1 = _run(setup, accum=1)
  p2, _, m2 = _run(setup, accum=2)
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  assert float(m1["tokens"]) == float(m2["tokens"]) > 0
  assert _max_diff(p1, p2) < 1e-6
  p_bf, _, m_bf = _run(setup, bf16=True)
  assert float(m_bf["loss"]) == pytest.approx(float(m1["loss"]), rel=2e-2)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype, p_bf, setup[1]))


def test_loss_counts_target_tokens_only_and_frozen_leaves_stay(setup):
  apply_fn, params, b, _, _ = setup
  total, count = step_lib.token_losses(apply_fn, params, b, "encoder_decoder")
  assert float(count) == float(np.sum(b["loss_mask"]))
  # Changing labels where the mask is 0 changes nothing.
  noisy = dict(b, labels=jnp.where(b["loss_mask"] > 0, b["labels"], 7))
  total2, _ = step_lib.token_losses(apply_fn, params, noisy, "encoder_decoder")
  assert float(total2) == pytest.approx(float(total))
  new, _, m = _run(setup)
  flat_old, flat_new = cj.flatten_with_paths(params), cj.flatten_with_paths(new)
  assert np.array_equal(flat_old["shared/embedding"], flat_new["shared/embedding"])
  assert np.array_equal(flat_old["encoder/layers/mlp_norm/scale"], flat_new["encoder/layers/mlp_norm/scale"])
  assert not np.array_equal(flat_old["encoder/layers/mlp/wi/weight"], flat_new["encoder/layers/mlp/wi/weight"])
  assert bool(m["finite"])


def test_non_finite_step_changes_nothing(setup):
  new, _, m = _run(setup, lr=float("nan"))
  assert not bool(m["finite"])
  assert _max_diff(new, setup[1]) == 0.0


def test_constrained_step_keeps_the_protected_directions(setup):
  params = setup[1]
  ranks = {"encoder/layers/self_attn/q/weight": np.array([8]), "decoder/layers/mlp/wo/weight": np.array([5])}
  new, state, _ = _run(setup, constrained=True, ranks=ranks, lr=1e-2)
  subs = cj.flatten_with_paths(cj.get_subspaces(state), is_leaf=lambda x: x is None or isinstance(x, cj.Subspace))
  for path in ranks:
    dw = cj.flatten_with_paths(new)[path] - cj.flatten_with_paths(params)[path]
    s = subs[path]
    norm = float(jnp.linalg.norm(dw))
    assert norm > 0
    assert float(jnp.linalg.norm(cj.protected_left(s, dw))) <= 1e-5 * norm
    assert float(jnp.linalg.norm(cj.protected_right(s, dw))) <= 1e-5 * norm


def test_first_non_finite_step_is_recorded_and_freezes_the_rest(setup):
  # Step 1 of 3 gets a NaN learning rate: the carry records it, and neither it nor the finite step after it
  # changes anything, so the state stays that of the last good step (the runner raises at its next fetch).
  apply_fn, params, b, osft, trainable = setup
  tx = step_lib.build_optimizer(OptimizerConfig(), osft, constrained=False)
  schedule = lambda c: jnp.where(c == 1, jnp.nan, 1e-3)
  step = jax.jit(step_lib.make_train_step(apply_fn, tx, kind="encoder_decoder", clip_norm=None,
                                          trainable=trainable, schedule=schedule))
  state, carry = tx.init(params), _carry(0)
  p1, state, carry, m1 = step(params, state, b, carry)
  assert bool(m1["finite"]) and int(carry.first_bad) == -1 and int(carry.step) == 1
  assert _max_diff(p1, params) > 0
  p2, state, carry, m2 = step(p1, state, b, carry)
  assert not bool(m2["finite"]) and int(carry.first_bad) == 1
  p3, _, carry, m3 = step(p2, state, b, carry)
  assert bool(m3["finite"]) and int(carry.first_bad) == 1 and int(carry.step) == 3
  assert _max_diff(p3, p1) == 0.0


def test_seen_tokens_count_inputs_and_targets_of_real_rows(setup):
  _, _, b, _, _ = setup
  mask, att = np.asarray(b["loss_mask"]), np.asarray(b["attention_mask"])
  want = att[mask.sum(-1) > 0].sum() + mask.sum()
  assert float(step_lib.seen_tokens(b, "encoder_decoder")) == want
  # A filler row (no target) adds nothing; decoder-only inputs already hold the target.
  filler = {k: np.asarray(v).copy() for k, v in b.items()}
  filler["loss_mask"][0] = 0
  want = att[1:].sum() + filler["loss_mask"].sum()
  assert float(step_lib.seen_tokens(filler, "encoder_decoder")) == want
  assert float(step_lib.seen_tokens(filler, "decoder")) == att[1:].sum()
