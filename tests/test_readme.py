"""The README's code blocks run as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
  assert len(_python_blocks()) >= 1


def test_readme_optimizer_example_runs():
  block = _python_blocks()[0]
  assert "cj.constrained" in block
  exec(compile(block, str(README), "exec"), {})


def test_readme_nnx_example_trains_three_tasks_with_growing_protection():
  block = next(b for b in _python_blocks() if "nnx.Optimizer" in b)
  namespace = {}
  exec(compile(block, str(README), "exec"), namespace)  # the block asserts the invariant after every task
  import clsvd_jax as cj

  final = cj.get_subspaces(namespace["opt"].opt_state)
  assert namespace["task"] == 2
  assert int(final["l1"]["kernel"].rank) == 12 and int(final["l2"]["kernel"].rank) == 6
  # The protection is on the model's own kernels, as [out, in] maps of the [in, out] arrays.
  assert final["l1"]["kernel"].matrix_shape == (32, 16) and final["l2"]["kernel"].matrix_shape == (8, 32)


def test_readme_commands_exist_in_makefile_and_ci():
  makefile = (README.parent / "Makefile").read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  assert re.search(r"^test:", makefile, re.M) and re.search(r"^demo:", makefile, re.M)
  assert "make test" in ci
  assert "make demo" in README.read_text() and "make test" in README.read_text()


@pytest.mark.multiprocess
def test_benchmark_script_runs_on_a_tiny_stack():
  out = subprocess.run(
      [sys.executable, str(README.parent / "benchmarks" / "overhead.py"), "--d", "16", "--layers", "1", "--tokens",
       "64", "--repeats", "1", "--protected", "0.5"],
      capture_output=True, text=True, check=True, timeout=300)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(row) >= {"protected", "step_ratio", "state_ratio"}
  assert row["protected"] == 0.5 and row["step_ratio"] > 0 and 2.0 < row["state_ratio"] < 3.2


def test_readme_model_example_runs_on_a_tiny_checkpoint(tmp_path):
  torch = __import__("pytest").importorskip("torch")
  import transformers

  block = next(b for b in _python_blocks() if "models.from_pretrained" in b)
  ckpt = tmp_path / "tiny-llama"
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, pad_token_id=0,
                                 bos_token_id=None, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt)
  transformers.ByT5Tokenizer().save_pretrained(ckpt)  # a byte-level tokenizer needs no vocabulary download
  code, n = re.subn(r'^CKPT = ".*?"', f"CKPT = {str(ckpt)!r}", block, flags=re.M)
  assert n == 1
  code = code.replace('"out/my-llama"', repr(str(tmp_path / "out")))
  exec(compile(code, str(README), "exec"), {})
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  original = transformers.LlamaForCausalLM.from_pretrained(ckpt)
  ids = torch.tensor([[5, 9, 77, 200]])
  with torch.no_grad():
    # bf16 round trip of float32 weights: close, not equal.
    diff = (reloaded(ids).logits - original(ids).logits).abs().max().item()
  assert diff < 5e-2, diff


def test_readme_baseline_snippets_are_valid_configs():
  import yaml

  from clsvd_jax import config as C
  from clsvd_jax.train.methods import METHODS

  text = README.read_text()
  section = text[text.index("## Baselines and `clsvd compare`"):]
  section = section[:section.index("\n## ", 1)]
  base = yaml.safe_load((README.parent / "configs" / "cpu_small.yaml").read_text())
  snippets = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
  assert len(snippets) >= 4
  for snippet in snippets:
    cfg = C.from_dict(base | yaml.safe_load(snippet), "README snippet")
    assert cfg.method in METHODS
  table_methods = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
  assert table_methods == set(METHODS)
