"""The baselines' config sections: validated like the rest (key paths named), resolved per method, refused early
where a method cannot run a config; none of these tests trains."""

import copy

import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.train import runner
from clsvd_jax.train.context import config_hash
from clsvd_jax.train.methods import get_method


@pytest.mark.parametrize("section, value, message", [
  ("replay", {"memroy_per_task": 3}, "replay.memroy_per_task: unknown key; allowed keys in replay: memory_per_task, "
                                     "strategy, ratio"),
  ("replay", {"ratio": 1.0}, "replay.ratio: must lie in [0, 1)"),
  ("replay", {"strategy": "fifo"}, "replay.strategy: 'fifo' is not allowed; expected one of 'reservoir', "
                                   "'per_label'"),
  ("ewc", {"lam": -1.0}, "ewc.lam: must be >= 0"),
  ("ewc", {"decay": 1.5}, "ewc.decay: must lie in [0, 1]"),
  ("ewc", {"fisher_batches": 0}, "ewc.fisher_batches: must be a positive integer"),
  ("lora", {"rank": 0}, "lora.rank: must be a positive integer"),
  ("lora", {"targets": ["("]}, "lora.targets[0]: '(' is not a valid regex"),
  ("lora", {"targets": []}, "lora.targets: is empty"),
  ("lora", {"orthogonality": "l2"}, "lora.orthogonality: 'l2' is not allowed"),
  ("gpm", {"eps": 0.0}, "gpm.eps: must lie in (0, 1]"),
  ("gpm", {"max_rank_ratio": 2.0}, "gpm.max_rank_ratio: must lie in (0, 1]"),
])
def test_bad_method_options_name_the_key(tmp_path, section, value, message):
  d = tiny_config_dict(tmp_path, method="seqft")
  d[section] = value
  with pytest.raises(C.ConfigError) as e:
    C.from_dict(d, "cfg.yaml")
  assert str(e.value).startswith("cfg.yaml: ") and message in str(e.value)


def test_config_hash_reads_only_the_methods_own_section(tmp_path):
  base = tiny_config_dict(tmp_path, method="osft")
  other = copy.deepcopy(base)
  other["ewc"] = {"lam": 5.0}
  other["replay"] = {"ratio": 0.5}
  assert config_hash(C.from_dict(base)) == config_hash(C.from_dict(other))
  ewc = dict(base, method="ewc")
  assert config_hash(C.from_dict(ewc)) != config_hash(C.from_dict(dict(other, method="ewc")))


def test_gpm_replaces_the_projection_and_keeps_the_policy(tmp_path):
  d = tiny_config_dict(tmp_path, method="gpm", gpm={"eps": 0.8, "max_rank_ratio": 0.5},
                       osft={"sides": "both", "basis_source": "weights", "calibration_batches": 3,
                             "param_policy": {"freeze": ["embedding"]}})
  cfg = get_method("gpm").resolve_config(C.from_dict(d))
  o = cfg.osft
  assert (o.sides, o.basis_source, o.start_protecting_from, o.rank_policy.name, o.rank_policy.eps) == (
      "right", "activations", 2, "energy", 0.8)
  assert o.max_rank_ratio == 0.5 and o.calibration_batches == 3 and o.param_policy.freeze == ["embedding"]
  assert C.from_dict(d).osft.sides == "both"  # the config as written is untouched


@pytest.mark.parametrize("method, change, message", [
  ("lora", {"lora": {"targets": ["no_such_matrix"]}}, "lora.targets ['no_such_matrix'] match none of the matrices"),
  ("olora", {"mesh": {"data": 1, "fsdp": -1, "tensor": 1}}, "method olora trains other arrays than the model's "
                                                            "parameters and runs on one device only"),
  ("pertask", {"eval": {"initial": False}}, "eval.initial: method pertask"),
])
def test_a_method_that_cannot_run_the_config_stops_before_training(tmp_path, method, change, message):
  d = tiny_config_dict(tmp_path, method=method, **change)
  with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    runner.run(C.from_dict(d), echo=None)
  assert not (tmp_path / f"run_{method}").exists()
