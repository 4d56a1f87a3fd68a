"""The parameter policy in force per method and model start (docs/design.md §6): seqft and mtl are full fine-tuning,
osft constrains the matrices and trains (random init) or freezes (checkpoint) the rest; results.json records it."""

import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import TINY_MODEL, tiny_config_dict

import clsvd_jax as cj
from clsvd_jax import config as C
from clsvd_jax import models
from clsvd_jax.config import ParamPolicyConfig
from clsvd_jax.data.tasks import DataError
from clsvd_jax.train import model_io, runner
from clsvd_jax.train import step as step_lib

LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "tie_word_embeddings": False}
T5_CONFIG = dict(TINY_MODEL["config"], model_type="t5")
# Parameters outside the matrices: what the two osft defaults disagree on.
NON_MATRIX = {
  "t5": {"shared/embedding", "lm_head/weight", "encoder/final_norm/scale", "decoder/final_norm/scale",
         "encoder/layers/mlp_norm/scale", "decoder/layers/cross_attn_norm/scale",
         "encoder/relative_attention_bias/embedding", "decoder/relative_attention_bias/embedding"},
  "llama": {"embed_tokens/embedding", "lm_head/weight", "norm/scale", "layers/input_layernorm/scale",
            "layers/post_attention_layernorm/scale"},
}


@pytest.fixture(scope="module", params=["t5", "llama"])
def family_params(request):
  config = T5_CONFIG if request.param == "t5" else LLAMA_CONFIG
  model = models.init_from_config(config, seed=0)
  return request.param, model_io.functional(model)[1], set(model_io.constrained_matrices(model))


def _labels(params, method, pretrained, cfg=None):
  cfg = cfg or ParamPolicyConfig()
  constrained = method == "osft"
  chosen = step_lib.resolve_param_policy(cfg, constrained=constrained, pretrained=pretrained, method=method)
  return chosen, cj.flatten_with_paths(chosen.policy.labels(params))


@pytest.mark.parametrize("method", ["seqft", "mtl"])
@pytest.mark.parametrize("pretrained", [False, True])
def test_unconstrained_methods_are_full_fine_tuning(family_params, method, pretrained):
  _, params, _ = family_params
  chosen, labels = _labels(params, method, pretrained)
  assert set(labels.values()) == {"train"}
  assert chosen.policy.default == "train" and f"method {method} constrains nothing" in chosen.reason


@pytest.mark.parametrize("pretrained", [False, True])
def test_osft_constrains_matrices_and_the_start_decides_the_rest(family_params, pretrained):
  family, params, matrices = family_params
  chosen, labels = _labels(params, "osft", pretrained)
  assert {p for p, a in labels.items() if a == "constrain"} == matrices
  rest = {p: a for p, a in labels.items() if p not in matrices}
  assert NON_MATRIX[family] <= set(rest)
  # Pretrained: the paper's frozen embeddings, head, norms and relative bias; random init: all of them train.
  want = "freeze" if pretrained else "train"
  assert set(rest.values()) == {want}
  assert ("pretrained" in chosen.reason) == pretrained and ("random" in chosen.reason) != pretrained


def test_explicit_rules_and_default_win(family_params):
  family, params, matrices = family_params
  embed = "shared/embedding" if family == "t5" else "embed_tokens/embedding"
  cfg = ParamPolicyConfig(freeze=["embedding$"])
  _, labels = _labels(params, "seqft", False, cfg)
  assert labels[embed] == "freeze" and labels["lm_head/weight"] == "train"
  cfg = ParamPolicyConfig(default="freeze", train=["lm_head"])
  chosen, labels = _labels(params, "osft", False, cfg)
  assert labels["lm_head/weight"] == "train" and labels[embed] == "freeze"
  assert "set in the config" in chosen.reason and "train ['lm_head']" in chosen.reason
  # Under a method that constrains nothing, 'constrain' as the default is plain training.
  _, labels = _labels(params, "seqft", False, ParamPolicyConfig(default="constrain", constrain=["nothing$"]))
  assert set(labels.values()) == {"train"}


def test_policy_of_run_reads_method_and_model_start(tmp_path):
  d = tiny_config_dict(tmp_path)
  assert step_lib.policy_of_run(C.from_dict(d)).policy.default == "train"
  d["model"] = {"path": str(tmp_path / "ckpt"), "tokenizer": "byt5"}
  assert step_lib.policy_of_run(C.from_dict(d)).policy.default == "freeze"
  d["method"] = "mtl"
  assert step_lib.policy_of_run(C.from_dict(d)).policy.default == "train"


def test_check_policy_counts_and_refuses_an_empty_policy(family_params):
  _, params, matrices = family_params
  chosen, _ = _labels(params, "osft", True)
  counts = step_lib.check_policy(params, chosen.policy)
  assert counts["constrain"] == len(matrices) and counts["train"] == 0 and counts["freeze"] > 0
  nothing = step_lib.resolve_param_policy(ParamPolicyConfig(constrain=["nothing$"]), constrained=True,
                                          pretrained=True).policy
  with pytest.raises(DataError, match="osft.param_policy: no parameter is constrained or trained"):
    step_lib.check_policy(params, nothing)


def _flat_copy(model):
  return {k: np.asarray(v) for k, v in cj.flatten_with_paths(model_io.functional(model)[1]).items()}


@pytest.mark.parametrize("method", ["seqft", "osft"])
def test_from_scratch_run_moves_every_parameter(tmp_path, method):
  # The runner end to end: on a model built from model.config both methods train every parameter (osft's
  # matrices in their free directions), and results.json says which policy was in force and why.
  d = tiny_config_dict(tmp_path, method=method, tasks=("low", "high"))
  d["eval"]["initial"] = False
  cfg = C.from_dict(d)
  p = runner.prepare(cfg)
  before = _flat_copy(p.model)
  res = runner.run(cfg, echo=None, prepared=p)
  after = _flat_copy(p.model)
  assert set(after) == set(before)
  still = [path for path in before if np.array_equal(before[path], after[path])]
  assert not still, still
  record = res["param_policy"]
  assert record["default"] == "train" and set(record["labels"]) == set(before)
  want = {"constrain", "train"} if method == "osft" else {"train"}
  assert set(record["labels"].values()) == want
  assert res["param_policy_counts"]["freeze"] == 0
  assert res["precision"] == {"load_dtype": "float32", "param_dtype": "float32", "compute_dtype": "float32"}
  assert all(a.dtype == jnp.float32 for a in after.values())
