"""LLaMA loaded onto a 2 x 2 mesh of 4 of the suite's 8 host CPU devices (tests/conftest.py): parameters land with
the partition rules' shardings, logits and greedy decoding equal the single-device model, bf16 loads sharded, and
``save_pretrained`` of the sharded model reproduces the checkpoint's tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from clsvd_jax import models
from clsvd_jax.parallel import make_mesh


@pytest.mark.slow
def test_load_sharded_on_four_cpu_devices(tmp_path):
  hf = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
  torch.manual_seed(0)
  path, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
  LlamaForCausalLM(hf).save_pretrained(path)
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  ref = models.from_pretrained(path)
  model = models.from_pretrained(path, mesh=mesh)  # the default rules (clsvd_jax.parallel.rules)
  p = model.params()
  q = p["layers"]["self_attn"]["q_proj"]["weight"]
  assert q.sharding.spec == P(None, "tensor", "fsdp"), q.sharding.spec
  assert q.addressable_shards[0].data.shape == (2, 32, 32), q.addressable_shards[0].data.shape
  assert p["layers"]["mlp"]["down_proj"]["weight"].sharding.spec == P(None, "fsdp", "tensor")
  assert p["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert p["norm"]["scale"].sharding.spec == P(None)
  # Custom rules: the first match wins; unmatched parameters follow the library's fallback.
  custom = models.from_pretrained(path, mesh=mesh, partition_rules=[(r"up_proj/weight$", ("fsdp", None))])
  assert custom.params()["layers"]["mlp"]["up_proj"]["weight"].sharding.spec == P(None, "fsdp", None)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 128, (4, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[3, :6] = 0
  want = np.asarray(ref(ids, mask))
  diff = np.abs(np.asarray(model(ids, mask)) - want)[mask > 0].max()
  assert diff <= 1e-5, diff
  gen = np.asarray(models.generate(model, ids, mask, max_new_tokens=8))
  np.testing.assert_array_equal(gen, np.asarray(models.generate(ref, ids, mask, max_new_tokens=8)))
  bf = models.from_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
  w = bf.params()["layers"]["mlp"]["gate_proj"]["weight"]
  assert w.dtype == jnp.bfloat16 and w.sharding.spec == P(None, "tensor", "fsdp")
  assert np.abs(np.asarray(bf(ids, mask)) - want)[mask > 0].max() < 0.1
  models.save_pretrained(model, out)
  a, b = load_file(path + "/model.safetensors"), load_file(out + "/model.safetensors")
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
