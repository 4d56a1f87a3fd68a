"""Memory arithmetic with float32 master weights: the bf16 compute copy is counted, a config's model.dtype does
not shrink the parameters, and the run's parameter policy decides which parameters carry moments."""

from pathlib import Path

import pytest

from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.parallel import memory
from clsvd_jax.train import step as step_lib

REPO = Path(__file__).resolve().parents[2]


def test_bf16_compute_adds_a_half_size_copy_of_the_parameters():
  f32 = memory.memory_report("llama-2-7b", {"fsdp": -1}, accelerator="v5p-64")
  mixed = memory.memory_report("llama-2-7b", {"fsdp": -1}, accelerator="v5p-64", compute_dtype="bfloat16")
  assert f32["per_device"]["compute_copy"] == 0 and f32["compute_dtype"] == "float32"
  assert mixed["compute_dtype"] == "bfloat16"
  # Every parameter (frozen ones too) is cast for the forward pass: half the float32 bytes, laid out the same.
  assert mixed["per_device"]["compute_copy"] * 2 == mixed["per_device"]["params"] == f32["per_device"]["params"]
  assert mixed["per_device"]["total"] == f32["per_device"]["total"] + mixed["per_device"]["compute_copy"]
  same = memory.memory_report("llama-2-7b", {"fsdp": -1}, accelerator="v5p-64", compute_dtype="float32")
  assert same["per_device"] == f32["per_device"]
  text = memory.format_memory_report(mixed)
  assert "parameters (float32)" in text and "bfloat16 copy (in step)" in text


def test_checkpoint_folder_names_map_to_presets():
  assert memory._preset_for_folder("data/Llama-2-7b-hf") == "llama-2-7b"
  assert memory._preset_for_folder("/x/Llama-3.1-8B/") == "llama-3.1-8b"
  assert memory._preset_for_folder("data/my-model") is None
  cfg = memory.load_model_config("data/Llama-2-7b-hf")
  assert cfg["hidden_size"] == 4096 and "preset; data/Llama-2-7b-hf not found" in cfg["name"]


@pytest.mark.parametrize("name", ["llama2_7b_order1.yaml", "llama31_8b_order1.yaml"])
def test_inspect_memory_of_the_llama_configs_shows_the_float32_masters(name, capsys):
  assert cli.main(["inspect", "--memory", str(REPO / "configs" / "llama" / name), "--accelerator", "v5p-64"]) == 0
  out = capsys.readouterr().out
  assert "parameters (float32)" in out and "bfloat16 copy (in step)" in out and "fits" in out


def test_the_run_policy_decides_which_parameters_carry_moments():
  # The demo's model with osft's own default policy (the demo freezes the non-matrix parameters on purpose).
  cfg = C.load_config(REPO / "configs" / "demo.yaml", ["osft.param_policy.default=auto"])
  model = {"model_type": cfg.model.family, **cfg.model.config}
  # The demo's model is built from a config: under osft every parameter trains (matrices constrained).
  scratch = memory.memory_report(model, devices=1, policy=step_lib.policy_of_run(cfg).policy)
  assert scratch["counts"]["trainable"] == scratch["counts"]["params"] > scratch["counts"]["constrained"] > 0
  # The same shapes as a pretrained osft run: only the matrices have moments.
  pretrained = step_lib.resolve_param_policy(cfg.osft.param_policy, constrained=True, pretrained=True).policy
  frozen = memory.memory_report(model, devices=1, policy=pretrained)
  assert frozen["counts"]["trainable"] == frozen["counts"]["constrained"] == scratch["counts"]["constrained"]
  assert frozen["per_device"]["moments"] < scratch["per_device"]["moments"]
