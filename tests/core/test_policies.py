"""Rank policies (monotone, min_trainable, paper formula) and the regex parameter policy."""

import numpy as np
import pytest

import clsvd_jax as cj
from clsvd_jax import rank_policy

SHAPES = {"layers/self_attn/q_proj/weight": (3, 16, 16), "layers/mlp/down_proj/weight": (3, 16, 40)}


def test_importance_ranks_follow_the_paper_formula():
  imp = {p: np.array([0.0, 0.5, 1.0]) for p in SHAPES}
  ranks = cj.importance_ranks(imp, SHAPES, mrr=0.1, trr=0.8, min_trainable=1)
  # r = 0.1 + I * 0.7 -> 0.1, 0.45, 0.8 of min(m, n) = 16.
  np.testing.assert_array_equal(ranks["layers/self_attn/q_proj/weight"], [1, 7, 12])
  assert ranks["layers/mlp/down_proj/weight"].dtype == np.int32


def test_ranks_never_shrink_and_leave_min_trainable():
  imp = {p: np.array([1.0, 1.0, 1.0]) for p in SHAPES}
  first = cj.importance_ranks(imp, SHAPES, mrr=1.0, trr=1.0, min_trainable=3)
  np.testing.assert_array_equal(first["layers/self_attn/q_proj/weight"], [13, 13, 13])
  prev = {p: np.array([2, 9, 4]) for p in SHAPES}
  low = cj.importance_ranks({p: np.zeros(3) for p in SHAPES}, SHAPES, mrr=0.1, trr=0.8, previous=prev)
  np.testing.assert_array_equal(low["layers/self_attn/q_proj/weight"], [2, 9, 4])


def test_normalize_importance_joint_min_max():
  out = cj.normalize_importance({"a": np.array([1.0, 3.0]), "b": np.array([2.0])})
  np.testing.assert_allclose(out["a"], [0.0, 1.0])
  np.testing.assert_allclose(out["b"], [0.5])
  flat = cj.normalize_importance({"a": np.array([2.0, 2.0])})
  np.testing.assert_allclose(flat["a"], [0.5, 0.5])


def test_schedule_ranks_grow_with_the_task_index():
  ks = [int(cj.schedule_ranks(t, {"w": (100, 50)}, rate=0.07)["w"]) for t in range(5)]
  assert ks == [0, 3, 7, 10, 14]
  capped = cj.schedule_ranks(40, {"w": (100, 50)}, rate=0.07, min_trainable=5)
  assert int(capped["w"]) == 45


def test_energy_ranks():
  s = np.array([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 -> cumulative 9/14, 13/14, 1
  assert int(rank_policy.energy_rank(s, 0.5)) == 1
  assert int(rank_policy.energy_rank(s, 0.9)) == 2
  assert int(rank_policy.energy_rank(s, 0.99)) == 3
  assert int(rank_policy.energy_rank(s, 0.0)) == 0
  out = cj.energy_ranks({"w": np.stack([s, s])}, 0.99, shapes={"w": (2, 4, 4)}, previous={"w": np.array([0, 4])},
                        min_trainable=1)
  np.testing.assert_array_equal(out["w"], [3, 4])


@pytest.mark.parametrize("call,pattern", [
    (lambda: cj.importance_ranks({}, SHAPES), "no importance for"),
    (lambda: cj.importance_ranks({"w": 0.5}, {"w": (4,)}), r"'w' has shape \(4,\)"),
    (lambda: rank_policy.retention_ratio(0.5, mrr=0.9, trr=0.1), "need 0 <= mrr <= trr <= 1"),
    (lambda: rank_policy.energy_rank(np.ones(3), 1.5), "eps must lie in"),
    (lambda: cj.schedule_ranks(-1, SHAPES), "task_index"),
])
def test_policy_errors(call, pattern):
  with pytest.raises(ValueError, match=pattern):
    call()


def test_capacity_rank_is_the_largest_rank_both_sides_can_store():
  # A side of dimension d and capacity c stores k protected or d - k allowed columns: k fits when k <= c or d - k <= c.
  assert rank_policy.capacity_rank((8, 4), None) == 4
  assert rank_policy.capacity_rank((8, 4), (2, 2)) == 2  # left (d 8, c 2) holds k <= 2 or k >= 6; k = 3 does not fit
  assert rank_policy.capacity_rank((8, 4), (4, 2)) == 4  # the default capacity (d // 2 per side) holds every rank
  assert rank_policy.capacity_rank((3, 8, 4), tuple(cj.default_capacity(8, 4, 0.5))) == 2  # a cap at half the range
  for m, n in ((6, 6), (10, 4)):
    for c_left in range(m // 2 + 1):
      for c_right in range(n // 2 + 1):
        fits = [k for k in range(min(m, n) + 1)
                if (k <= c_left or m - k <= c_left) and (k <= c_right or n - k <= c_right)]
        # Fitting ranks form a prefix up to the bound: a rank that fits only from the top end (d - k <= c) and lies
        # beyond a gap is not reachable by growing, so the bound stops at the first rank that does not fit.
        want = next((k - 1 for k in range(min(m, n) + 1) if k not in fits), min(m, n))
        assert rank_policy.capacity_rank((m, n), (c_left, c_right)) == want


def test_default_param_policy_matches_llama_and_t5_paths():
  policy = cj.ParamPolicy()
  constrained = [
      "layers/self_attn/q_proj/weight", "layers/self_attn/o_proj/weight", "layers/mlp/down_proj/weight",
      "encoder/layers/self_attn/q/weight", "decoder/layers/cross_attn/v/weight", "decoder/layers/mlp/wi_1/weight",
      "encoder/layers/mlp/wo/weight",
  ]
  frozen = [
      "embed_tokens/embedding", "lm_head/weight", "norm/scale", "layers/input_layernorm/scale",
      "encoder/relative_attention_bias/embedding", "shared/embedding", "layers/self_attn/q_proj/bias",
  ]
  for path in constrained:
    assert policy.action(path) == "constrain", path
  for path in frozen:
    assert policy.action(path) == "freeze", path


def test_param_policy_from_config_order_and_errors():
  policy = cj.ParamPolicy.from_config(freeze=[r"layers/self_attn/k_proj"], train=[r"norm/scale$"])
  assert policy.action("layers/self_attn/k_proj/weight") == "freeze"
  assert policy.action("norm/scale") == "train"
  with pytest.raises(ValueError, match="unknown action 'tune'"):
    cj.ParamPolicy(rules=(("x", "tune"),))
  with pytest.raises(ValueError, match="not a valid regex"):
    cj.ParamPolicy(rules=(("(", "train"),))
  with pytest.raises(ValueError, match=r"constrains 'norm/scale' of shape \(4,\)"):
    cj.ParamPolicy(rules=(("norm", "constrain"),)).labels({"norm": {"scale": np.ones(4)}})
