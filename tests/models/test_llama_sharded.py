"""LLaMA loaded onto a 2 x 2 mesh of CPU devices (a subprocess with 4 host devices): parameters land with the
partition rules' shardings, logits and greedy decoding equal the single-device model, bf16 loads sharded, and
``save_pretrained`` of the sharded model reproduces the checkpoint's tensors."""

import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from clsvd_jax import models
from clsvd_jax.parallel import make_mesh
path, out = sys.argv[1], sys.argv[2]
mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
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
mask = np.ones_like(ids); mask[1, :3] = 0; mask[3, :6] = 0
want = np.asarray(ref(ids, mask))
diff = np.abs(np.asarray(model(ids, mask)) - want)[mask > 0].max()
assert diff <= 1e-5, diff
gen = np.asarray(models.generate(model, ids, mask, max_new_tokens=8))
assert (gen == np.asarray(models.generate(ref, ids, mask, max_new_tokens=8))).all()
bf = models.from_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
w = bf.params()["layers"]["mlp"]["gate_proj"]["weight"]
assert w.dtype == jnp.bfloat16 and w.sharding.spec == P(None, "tensor", "fsdp")
assert np.abs(np.asarray(bf(ids, mask)) - want)[mask > 0].max() < 0.1
models.save_pretrained(model, out)
a, b = load_file(path + "/model.safetensors"), load_file(out + "/model.safetensors")
assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
print("OK")
"""


def test_load_sharded_on_four_cpu_devices(tmp_path):
  hf = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
  torch.manual_seed(0)
  LlamaForCausalLM(hf).save_pretrained(tmp_path / "ckpt")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "out")], env=env,
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
