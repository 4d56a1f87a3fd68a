"""The task scheduler: block importance, rank policies, accumulation into the optimizer state, state round trip,
and the matrix-input covariances of the activations basis source."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import clsvd_jax as cj
from clsvd_jax._src import rank_policy as rp
from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax.config import OptimizerConfig, OsftConfig, RankPolicyConfig
from clsvd_jax.data import BatchIterator, encode_examples, load_task, tokenizer_info
from clsvd_jax.data.tasks import TaskSpec
from clsvd_jax.models import t5
from clsvd_jax.train import covariance, model_io
from clsvd_jax.train import scheduler as S
from clsvd_jax.train import step as step_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sched")
  cfg = t5.config_from_hf({"model_type": "t5", "vocab_size": 384, "d_model": 16, "d_kv": 4, "d_ff": 16,
                           "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
                           "tie_word_embeddings": False})
  model = t5.init(cfg, seed=1)
  tok = transformers.ByT5Tokenizer()
  data = load_task(TaskSpec(name="low", source="synthetic", path=str(tmp / "data"), max_train=16))
  split = encode_examples(data.task, data.train, tok, kind="encoder_decoder", max_length=128, max_target_length=8)
  info = tokenizer_info(tok, "encoder_decoder")
  batch = BatchIterator(split, info, batch_size=4, seed=0).batch_at(0, 0)
  return model, batch


def _inputs(model, batch):
  return S.BoundaryInputs(hidden_states=lambda b: model_io.block_hidden_states(model, b),
                          token_masks=model_io.token_mask_for_stack, importance_batches=[batch])


def _state(model, osft):
  tx = step_lib.build_optimizer(OptimizerConfig(), osft, constrained=True)
  params = model.params()
  return tx, params, tx.init(params)


def test_block_cosines_by_hand():
  a = jnp.asarray(np.array([[[[1.0, 0.0], [1.0, 1.0]]]]))  # [L=1, B=1, T=2, D=2]
  b = jnp.asarray(np.array([[[[1.0, 0.0], [-1.0, -1.0]]]]))
  cos = S.block_cosines({"layers": (a, b)}, {"layers": np.array([[1, 1]])})
  assert cos["layers"] == pytest.approx([0.0])  # (1 + -1) / 2
  cos = S.block_cosines({"layers": (a, b)}, {"layers": np.array([[1, 0]])})  # the pad token does not count
  assert cos["layers"] == pytest.approx([1.0])
  imp = rp.importance_from_cosines({"x": np.array([0.9, 0.5])}, "1-cos")
  assert imp["x"] == pytest.approx([0.1, 0.5])
  assert rp.importance_from_cosines({"x": np.array([0.9, 0.5])}, "cos")["x"] == pytest.approx([0.9, 0.5])


def test_energy_extension_by_hand():
  # total 10, protected 4, spectrum^2 = 3, 2, 1: eps 0.8 needs 8 -> 4 + 3 + 2 = 9 >= 8 after 2 directions.
  j = rp.energy_extension(np.array(4.0), np.sqrt(np.array([3.0, 2.0, 1.0])), np.array(10.0), 0.8)
  assert int(j) == 2
  assert int(rp.energy_extension(np.array(9.0), np.array([1.0]), np.array(10.0), 0.8)) == 0


def test_importance_boundaries_accumulate_and_round_trip(setup):
  model, batch = setup
  osft = OsftConfig(rank_policy=RankPolicyConfig(name="importance", mrr=0.2, trr=0.6, growth="incremental"))
  tx, params, opt_state = _state(model, osft)
  shapes = model_io.constrained_matrices(model)
  sched = S.TaskScheduler(osft, shapes, 3)
  opt_state = sched.before_task(0, params, opt_state, _inputs(model, batch))
  first = {p: np.asarray(k) for p, k in sched.ranks.items()}
  subs = subspace_lib.subspaces_by_path(cj.get_subspaces(opt_state))
  for path, shape in shapes.items():
    s = subs[path]
    np.testing.assert_array_equal(np.asarray(s.rank), first[path])
    r = np.asarray(rp.retention_ratio(0.0, mrr=0.2, trr=0.6))
    assert (first[path] >= np.floor(r * min(shape[-2:]))).all()
  rec = sched.records[0]
  assert rec["protected"] and set(rec["importance"]) == {"encoder/layers", "decoder/layers"}
  all_imp = np.concatenate([np.asarray(v) for v in rec["importance"].values()])
  assert all_imp.min() == pytest.approx(0.0) and all_imp.max() == pytest.approx(1.0)
  # The most important block protects the most (1 - cos direction, trr for importance 1).
  enc = np.asarray(rec["importance"]["encoder/layers"])
  k_q = first["encoder/layers/self_attn/q/weight"]
  assert k_q[np.argmax(enc)] >= k_q[np.argmin(enc)]

  # Task 2: incremental growth protects more, and contains the old subspace exactly.
  state = sched.to_dict()
  again = S.TaskScheduler.from_dict(osft, state)
  assert again.to_dict() == state
  old = subs["encoder/layers/mlp/wi_0/weight"]
  opt_state = again.before_task(1, params, opt_state, _inputs(model, batch))
  for path in shapes:
    assert (np.asarray(again.ranks[path]) >= first[path]).all()
    assert (np.asarray(again.ranks[path]) > first[path]).any()
  new = subspace_lib.subspaces_by_path(cj.get_subspaces(opt_state))["encoder/layers/mlp/wi_0/weight"]
  u_old, u_new = cj.protected_basis(old, "left"), cj.protected_basis(new, "left")
  proj_new = jnp.einsum("lmc,lnc->lmn", u_new, u_new)
  assert float(jnp.max(jnp.abs(jnp.einsum("lmn,lnc->lmc", proj_new, u_old) - u_old))) < 1e-4
  energy = again.records[-1]["energy"]["encoder/layers/mlp/wo/weight"]
  assert all(0 < e < 1 for e in energy)

  # Reset keeps the subspaces and zeroes the moments.
  reset = S.reset_moments(tx, params, opt_state)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), cj.get_subspaces(reset),
                                   cj.get_subspaces(opt_state)))


def test_start_from_task_two_and_policy_none(setup):
  model, batch = setup
  osft = OsftConfig(start_protecting_from=2, rank_policy=RankPolicyConfig(name="schedule", rate=0.25))
  _, params, opt_state = _state(model, osft)
  sched = S.TaskScheduler(osft, model_io.constrained_matrices(model), 3)
  opt_state = sched.before_task(0, params, opt_state, _inputs(model, batch))
  assert not sched.records[0]["protected"]
  assert all((np.asarray(k) == 0).all() for k in sched.ranks.values())
  opt_state = sched.before_task(1, params, opt_state, _inputs(model, batch))
  # schedule: ratio 0.25 * (one finished task) of min(m, n) = 16 -> 4.
  assert (np.asarray(sched.ranks["encoder/layers/self_attn/q/weight"]) == 4).all()
  none = S.TaskScheduler(OsftConfig(rank_policy=RankPolicyConfig(name="none")), sched.shapes, 2)
  none.before_task(0, params, opt_state, _inputs(model, batch))
  assert not none.records[0]["protected"]


def test_energy_policy_with_activations_meets_eps(setup):
  model, batch = setup
  osft = OsftConfig(start_protecting_from=2, basis_source="activations",
                    rank_policy=RankPolicyConfig(name="energy", eps=0.9))
  _, params, opt_state = _state(model, osft)
  covs = covariance.matrix_input_covariances(model, [batch])
  sched = S.TaskScheduler(osft, model_io.constrained_matrices(model), 2)
  inputs = _inputs(model, batch)
  inputs.covariances = covs
  opt_state = sched.before_task(1, params, opt_state, inputs)
  subs = subspace_lib.subspaces_by_path(cj.get_subspaces(opt_state))
  paths = ("encoder/layers/self_attn/k/weight", "decoder/layers/mlp/wo/weight", "decoder/layers/cross_attn/v/weight")
  for path in paths:
    v = cj.protected_basis(subs[path], "right")
    c = jnp.asarray(covs[path])
    kept = jnp.einsum("lnc,lnm,lmc->l", v, c, v) / jnp.trace(c, axis1=-2, axis2=-1)
    assert (np.asarray(kept) >= 0.9 - 1e-4).all(), path
    assert (np.asarray(subs[path].rank) < min(model_io.constrained_matrices(model)[path][-2:])).all()


def test_covariances_of_a_runner_batch(setup):
  # A runner batch (with labels and loss masks) goes through the model's covariance pass; the full check of every
  # matrix input against PyTorch forward hooks is in tests/models/test_t5_model.py.
  model, batch = setup
  hidden = model_io.block_hidden_states(model, batch)
  covs = covariance.matrix_input_covariances(model, [batch])
  assert set(covs) == set(model_io.constrained_matrices(model))
  # The encoder's q input is the normed block input: check the statistic by hand on block 0.
  from clsvd_jax.models.t5 import model as t5m

  h = hidden["encoder/layers"][0][0]
  scale = model.params()["encoder"]["layers"]["self_attn_norm"]["scale"][0]
  x = t5m.rms_norm(h, scale, model.config.layer_norm_epsilon)
  x = np.asarray(x) * np.asarray(batch["attention_mask"])[..., None]
  want = np.einsum("bti,btj->ij", x, x)
  np.testing.assert_allclose(np.asarray(covs["encoder/layers/self_attn/q/weight"][0]), want, rtol=1e-4, atol=1e-4)
  assert covs["encoder/layers/mlp/wo/weight"].shape == (2, 16, 16)
