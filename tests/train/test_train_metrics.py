"""Metrics against hand-computed values, the invariant ratios, the config schema, schedules and the method registry."""

import jax.numpy as jnp
import numpy as np
import pytest

import clsvd_jax as cj
from clsvd_jax import config as C
from clsvd_jax.train import methods, metrics
from clsvd_jax.train import step as step_lib

R = [[0.9, 0.1, 0.0],
     [0.6, 0.8, 0.2],
     [0.5, 0.4, 0.7]]


def test_metrics_match_hand_computed_values():
  s = metrics.summarize(R, baseline=[0.0, 0.05, 0.1], correct_last=[5, 4, 14], total=[10, 10, 20])
  assert s["AA"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)
  # BWT: ((0.5 - 0.9) + (0.4 - 0.8)) / 2
  assert s["BWT"] == pytest.approx(-0.4)
  # FWT: ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.1 - 0.05) + (0.2 - 0.1)) / 2
  assert s["FWT"] == pytest.approx(0.075)
  # forgetting: (max(0.9, 0.6) - 0.5 + max(0.1, 0.8) - 0.4) / 2
  assert s["forgetting"] == pytest.approx(0.4)
  assert s["pooled_accuracy"] == pytest.approx(23 / 40)
  assert s["final_accuracy"] == pytest.approx([0.5, 0.4, 0.7])


def test_metrics_for_one_task_and_bad_shapes():
  s = metrics.summarize([[0.3, 0.2]], baseline=None)
  assert s["AA"] == pytest.approx(0.25) and s["BWT"] is None and s["FWT"] is None and s["forgetting"] is None
  with pytest.raises(ValueError, match="R must be"):
    metrics.summarize([[0.1], [0.2]])
  with pytest.raises(ValueError, match="one accuracy per task"):
    metrics.forward_transfer(R, [0.0, 0.1])


def test_invariant_ratios_see_a_leak_and_a_clean_update():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  subs = cj.compute_subspaces({"w": w}, {"w": np.array([3, 5])})
  s = subs["w"]
  g = jnp.asarray(rng.normal(size=w.shape), jnp.float32)
  clean = cj.project(g, s, "both")
  r = metrics.invariant_ratios({"w": w}, {"w": w + clean}, {"w": s})
  assert r["w"]["left"] < 1e-5 and r["w"]["right"] < 1e-5 and r["w"]["block"] < 1e-5
  leaky = metrics.invariant_ratios({"w": w}, {"w": w + g}, {"w": s})
  assert leaky["w"]["left"] > 0.1 and leaky["w"]["right"] > 0.1
  # `left` updates keep only U^T dW = 0: the right ratio is not the variant's invariant.
  left_only = metrics.invariant_ratios({"w": w}, {"w": w + cj.project(g, s, "left")}, {"w": s})
  assert metrics.invariant_max([left_only], "left") < 1e-5
  assert metrics.invariant_max([left_only], "both") > 0.1
  assert metrics.invariant_max([], "both") == 0.0
  # A layer that moved by rounding noise only is static: left out, counted, not reported as a leak.
  still = w.at[0].add(1e-9 * g[0])
  r = metrics.invariant_ratios({"w": w}, {"w": still + clean.at[0].set(0.0)}, {"w": s}, steps=10)
  assert r["w"]["static_layers"] == 1 and r["w"]["left"] < 1e-5
  assert 0 < r["w"]["floor"] < 1e-3
  none_moved = metrics.invariant_ratios({"w": w}, {"w": w}, {"w": s})
  assert none_moved["w"] == {"left": 0.0, "right": 0.0, "block": 0.0, "floor": 0.0, "static_layers": 2}


def _base():
  return {"model": {"config": {"d_model": 8}, "tokenizer": "byt5"}, "tasks": [{"name": "low", "source": "synthetic"}]}


@pytest.mark.parametrize("patch, message", [
  ({"trainig": {}}, "trainig: unknown key; allowed keys: model, tasks, method"),
  ({"osft": {"rank_policy": {"mmr": 0.1}}}, "osft.rank_policy.mmr: unknown key; allowed keys in osft.rank_policy: "
                                            "name, mrr, trr"),
  ({"training": {"batch_size": "eight"}}, "training.batch_size: expected int, got str 'eight'"),
  ({"training": {"bf16_compute": 1}}, "training.bf16_compute: expected bool"),
  ({"osft": {"sides": "up"}}, "osft.sides: 'up' is not allowed; expected one of 'both', 'left', 'right', 'block'"),
  ({"osft": {"start_protecting_from": 3}}, "osft.start_protecting_from: 3 is not allowed"),
  ({"method": "sgd"}, "method: unknown method 'sgd'; registered methods: ewc, gpm, lora, mtl, olora, osft, pertask, "
                     "replay, seqft"),
  ({"tasks": [{"name": "low", "source": "synthetic", "max_trian": 3}]}, "tasks[0]: unknown key(s) ['max_trian']"),
  ({"osft": {"rank_policy": {"mrr": 0.9, "trr": 0.1}}}, "need 0 <= mrr <= trr <= 1"),
  ({"optimizer": {"grad_accum": 3}}, "must be divisible by grad_accum=3"),
  ({"osft": {"basis_source": "activations"}}, "set osft.start_protecting_from: 2"),
  ({"model": {"tokenizer": "byt5"}}, "give either model.path"),
  ({"optimizer": {"lr": float("nan")}}, "optimizer.lr: must be a finite number, got nan"),
  ({"optimizer": {"lr": float("inf")}}, "optimizer.lr: must be a finite number, got inf"),
  ({"optimizer": {"clip_norm": float("-inf")}}, "optimizer.clip_norm: must be a finite number, got -inf"),
  ({"osft": {"rank_policy": {"eps": float("nan")}}}, "osft.rank_policy.eps: must be a finite number"),
  ({"training": {"watchdog_seconds": -1}}, "training.watchdog_seconds: must be >= 0"),
  ({"training": {"max_truncated_share": 1.5}}, "training.max_truncated_share: must lie in [0, 1]"),
])
def test_config_validation_names_the_key(patch, message):
  d = _base()
  for k, v in patch.items():
    if isinstance(v, dict) and isinstance(d.get(k), dict):
      d[k] = {**d[k], **v} if k != "model" else v
    else:
      d[k] = v
  with pytest.raises(C.ConfigError) as e:
    C.from_dict(d, "my.yaml")
  assert str(e.value).startswith("my.yaml: ")
  assert message in str(e.value)


def test_config_defaults_round_trip_and_float_from_int(tmp_path):
  d = _base()
  d["optimizer"] = {"lr": 1}
  cfg = C.from_dict(d)
  assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
  assert cfg.osft.rank_policy.importance_direction == "1-cos"
  assert C.from_dict(cfg.to_dict()) == cfg
  path = tmp_path / "c.yaml"
  C.dump_config(cfg, path)
  assert C.load_config(path) .optimizer == cfg.optimizer


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model: {config: {d_model: 8}, tokenizer: byt5}\ntasks: [{name: low, source: synthetic}]\n")
  cfg = C.load_config(path, ["training.seed=3", "osft.sides=left", "osft.param_policy.freeze=[embedding]",
                             "tasks.0.max_train=7", "optimizer.clip_norm=null"])
  assert cfg.training.seed == 3 and cfg.osft.sides == "left"
  assert cfg.osft.param_policy.freeze == ["embedding"]
  assert cfg.tasks[0]["max_train"] == 7 and cfg.optimizer.clip_norm is None
  assert cfg.data_dir == str(tmp_path.resolve())
  with pytest.raises(C.ConfigError, match="expected key.path=value"):
    C.load_config(path, ["training.seed"])
  with pytest.raises(C.ConfigError, match="training.sed: unknown key"):
    C.load_config(path, ["training.sed=1"])
  with pytest.raises(C.ConfigError, match="not an index"):
    C.load_config(path, ["tasks.4.max_train=1"])
  with pytest.raises(C.ConfigError, match="not found"):
    C.load_config(tmp_path / "missing.yaml")


def test_learning_rate_schedules():
  cfg = C.OptimizerConfig(lr=1.0, warmup_steps=2, schedule="linear")
  assert [step_lib.learning_rate(s, 6, cfg) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
  cos = C.OptimizerConfig(lr=2.0, schedule="cosine")
  assert step_lib.learning_rate(0, 4, cos) == pytest.approx(2.0)
  assert step_lib.learning_rate(2, 4, cos) == pytest.approx(1.0)
  assert step_lib.learning_rate(3, 4, C.OptimizerConfig(lr=0.1)) == pytest.approx(0.1)


def test_method_registry():
  assert methods.get_method("mtl").stages(3) == [[0, 1, 2]]
  assert methods.get_method("seqft").stages(2) == [[0], [1]]
  with pytest.raises(ValueError, match="already registered"):
    methods.register_method(methods.Method("osft", constrained=True))
  new = methods.register_method(methods.Method("frozen_test", constrained=True))
  try:
    d = _base()
    d["method"] = "frozen_test"
    assert C.from_dict(d).method == "frozen_test"
  finally:
    methods.METHODS.pop(new.name)
