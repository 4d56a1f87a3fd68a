"""Single-device unit tests of the scale code: mesh sizes, partition rules and fallbacks, optimizer-state specs,
distributed config from the environment, host slices and the memory arithmetic (no devices needed)."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import clsvd_jax
from clsvd_jax import flatten_with_paths
from clsvd_jax.parallel import distributed, memory, mesh, opt_state, rules

SIZES = {"data": 2, "fsdp": 4, "tensor": 2}


# ---------------------------------------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("spec,devices,want", [
    ({"data": 2, "fsdp": -1, "tensor": 2}, 16, (2, 4, 2)),
    ({"fsdp": -1}, 8, (1, 8, 1)),
    (None, 8, (1, 8, 1)),
    ([1, 4, 2], 8, (1, 4, 2)),
    ({"data": -1, "tensor": 4}, 32, (8, 1, 4)),
])
def test_resolve_mesh_shape(spec, devices, want):
  assert mesh.resolve_mesh_shape(spec, devices) == want


@pytest.mark.parametrize("spec,devices,match", [
    ({"data": 3, "fsdp": -1}, 8, "does not divide"),
    ({"data": 2, "fsdp": 2}, 8, "needs 4 devices"),
    ({"data": -1, "fsdp": -1}, 8, "only one axis"),
    ({"model": 2}, 8, "unknown axis"),
    ({"fsdp": 0}, 8, "mesh.fsdp"),
])
def test_resolve_mesh_shape_errors(spec, devices, match):
  with pytest.raises(ValueError, match=match):
    mesh.resolve_mesh_shape(spec, devices)


def test_make_mesh_on_this_host():
  m = mesh.make_mesh({"fsdp": -1})
  assert m.axis_names == ("data", "fsdp", "tensor")
  assert mesh.mesh_shape(m) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


# ---------------------------------------------------------------------------------------------------------- rules


def test_llama_rules_stacked_and_unstacked():
  spec = lambda path, shape: rules.spec_for(path, shape, SIZES)
  assert spec("layers/self_attn/q_proj/weight", (32, 4096, 4096)) == P(None, "tensor", "fsdp")
  assert spec("layers/self_attn/o_proj/weight", (32, 4096, 4096)) == P(None, "fsdp", "tensor")
  assert spec("layers/mlp/gate_proj/weight", (32, 11008, 4096)) == P(None, "tensor", "fsdp")
  assert spec("layers/mlp/down_proj/weight", (32, 4096, 11008)) == P(None, "fsdp", "tensor")
  # The same rule serves an unstacked weight: it names the trailing dims.
  assert spec("self_attn/q_proj/weight", (4096, 4096)) == P("tensor", "fsdp")
  assert spec("embed_tokens/embedding", (32000, 4096)) == P("tensor", "fsdp")
  assert spec("lm_head/weight", (32000, 4096)) == P("tensor", "fsdp")
  assert spec("layers/self_attn/k_proj/bias", (32, 1024)) == P(None, "tensor")
  assert spec("layers/input_layernorm/scale", (32, 4096)) == P(None, None)
  assert spec("norm/scale", (4096,)) == P(None)


def test_t5_rules():
  spec = lambda path, shape: rules.spec_for(path, shape, SIZES)
  for stack in ("encoder", "decoder"):
    assert spec(f"{stack}/layers/self_attn/q/weight", (24, 1024, 1024)) == P(None, "tensor", "fsdp")
    assert spec(f"{stack}/layers/self_attn/o/weight", (24, 1024, 1024)) == P(None, "fsdp", "tensor")
    assert spec(f"{stack}/layers/mlp/wo/weight", (24, 1024, 4096)) == P(None, "fsdp", "tensor")
    assert spec(f"{stack}/relative_attention_bias/embedding", (32, 16)) == P(None, None)
  assert spec("decoder/layers/cross_attn/k/weight", (24, 1024, 1024)) == P(None, "tensor", "fsdp")
  assert spec("decoder/layers/mlp/wi_1/weight", (24, 2816, 1024)) == P(None, "tensor", "fsdp")
  assert spec("shared/embedding", (32128, 1024)) == P("tensor", "fsdp")


def test_dims_that_do_not_divide_fall_back_to_replication_and_are_reported():
  notes = []
  # 6 KV heads * 128 = 768 rows divide tensor=2 but not tensor=5; vocab 32001 divides nothing.
  got = rules.spec_for("layers/self_attn/k_proj/weight", (4, 768, 4096), {"data": 1, "fsdp": 4, "tensor": 5},
                       notes=notes)
  assert got == P(None, None, "fsdp")
  got = rules.spec_for("embed_tokens/embedding", (32001, 4096), SIZES, notes=notes)
  assert got == P(None, "fsdp")
  assert [(n.path, n.dim) for n in notes] == [("layers/self_attn/k_proj/weight", 1), ("embed_tokens/embedding", 0)]
  assert "does not divide" in str(notes[0])


def test_axis_map_shards_over_data_too():
  got = rules.spec_for("layers/mlp/up_proj/weight", (32, 11008, 4096), SIZES, axis_map={"fsdp": ("data", "fsdp")})
  assert got == P(None, "tensor", ("data", "fsdp"))
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    rules.spec_for("layers/mlp/up_proj/weight", (32, 8, 8), SIZES, axis_map={"tensor": "model"})


def test_unmatched_parameters():
  notes = []
  assert rules.spec_for("adapter/kernel", (1024, 512), SIZES, notes=notes) == P("fsdp", None)
  assert rules.spec_for("adapter/small", (4, 4), SIZES) == P(None, None)
  assert rules.spec_for("adapter/kernel", (1024, 512), SIZES, unmatched="replicate") == P(None, None)
  with pytest.raises(ValueError, match="no partition rule matches parameter 'adapter/kernel'"):
    rules.spec_for("adapter/kernel", (1024, 512), SIZES, unmatched="error")
  assert "no rule matches" in str(notes[0])
  with pytest.raises(ValueError, match="write the rule for the trailing dims"):
    rules.spec_for("norm/scale", (), SIZES, rules=[("norm", ("fsdp",))])


def test_batch_shardings_need_a_multiple_of_data_times_fsdp():
  m = mesh.make_mesh({"fsdp": -1})
  sh = rules.batch_shardings(m, {"ids": np.zeros((8, 5), np.int32)})
  assert sh["ids"].spec == P(("data", "fsdp"), None)
  # The size check needs only axis sizes, so a mapping stands in for a 4-device mesh.
  with pytest.raises(ValueError, match="'ids'.*multiple of data x fsdp = 4"):
    rules.batch_shardings({"data": 2, "fsdp": 2, "tensor": 1}, {"ids": np.zeros((6, 5))})


# ---------------------------------------------------------------------------------------------------- opt state


def test_opt_state_specs_follow_params_and_weights():
  params = {"layers": {"self_attn": {"q_proj": {"weight": jax.ShapeDtypeStruct((4, 64, 32), np.float32)}},
                       "input_layernorm": {"scale": jax.ShapeDtypeStruct((4, 32), np.float32)}},
            "lm_head": {"weight": jax.ShapeDtypeStruct((128, 32), np.float32)}}
  tx = clsvd_jax.constrained(optax.adamw(1e-3), capacity=(16, 8))
  state = jax.eval_shape(tx.init, params)
  p_specs = rules.param_specs(params, SIZES)
  specs = opt_state.opt_state_specs(state, params, p_specs, SIZES)
  flat = flatten_with_paths(specs, is_leaf=lambda x: isinstance(x, P | clsvd_jax.Subspace) or x is None)
  q = "layers/self_attn/q_proj/weight"
  # Adam moments take their parameter's spec; the step count is replicated.
  assert flat[f"inner_state/0/mu/{q}"] == P(None, "tensor", "fsdp")
  assert flat["inner_state/0/nu/lm_head/weight"] == P("tensor", "fsdp")
  assert flat["inner_state/0/count"] == P()
  sub = flat[f"subspaces/{q}"]
  # left [4, 64, 16]: out dim on tensor, capacity 16 on fsdp (4 divides 16); right [4, 32, 8]: in dim on fsdp,
  # capacity 8 on tensor.
  assert sub.left == P(None, "tensor", "fsdp") and sub.right == P(None, "fsdp", "tensor")
  assert sub.rank == P() and sub.left_allow == P()
  # lm_head [128, 32] (a 2-D leaf, constrained by the default mask): its bases follow it too.
  assert flat["subspaces/lm_head/weight"].left == P("tensor", "fsdp")


def test_capacity_that_does_not_divide_stays_unsharded():
  sub = opt_state.subspace_specs(P(None, "tensor", "fsdp"), (4, 64, 32), (6, 8), SIZES)
  assert sub.left == P(None, "tensor", None)  # 6 columns do not divide fsdp=4
  assert sub.right == P(None, "fsdp", "tensor")


def test_subspace_at_unknown_path_is_an_error():
  params = {"w": jax.ShapeDtypeStruct((8, 8), np.float32)}
  state = jax.eval_shape(clsvd_jax.constrained(optax.sgd(1.0)).init, params)
  with pytest.raises(ValueError, match="no parameter of that shape"):
    opt_state.opt_state_specs(state, {"v": params["w"]}, {"v": P()}, SIZES)


# --------------------------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("env,config,want", [
    ({}, None, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}, None,
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
    ({"CLSVD_DISTRIBUTED": "1"}, None, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, None, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None, None),
    ({"SLURM_NTASKS": "8"}, None, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1", "CLSVD_DISTRIBUTED": "0"}, None, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {"enabled": False}, None),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}),
    ({}, {"enabled": True}, {}),
])
def test_distributed_config(env, config, want):
  assert distributed.distributed_config(config, env) == want


def test_distributed_config_errors():
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.distributed_config(None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="unknown field"):
    distributed.distributed_config({"coordinator": "h:1"}, {})


def test_single_process_defaults():
  assert distributed.initialize_from_env(env={}) is False
  assert distributed.is_main_process()


def test_host_slice_covers_everything_once():
  parts = [distributed.host_slice(10, i, 4) for i in range(4)]
  assert [(s.start, s.stop) for s in parts] == [(0, 3), (3, 6), (6, 8), (8, 10)]
  with pytest.raises(ValueError):
    distributed.host_slice(10, 4, 4)


def test_host_rows_single_process_is_the_whole_batch():
  # One process owns every device of the mesh (8 host devices in the suite), so it holds every row.
  m = mesh.make_mesh({"fsdp": -1})
  rows = 2 * jax.device_count()
  sh = rules.batch_shardings(m, np.zeros((rows, 3)))
  assert distributed.host_rows(sh, (rows, 3)) == slice(0, rows)
  batch = distributed.host_local_batch({"x": np.arange(3.0 * rows).reshape(rows, 3)}, {"x": sh})
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(3.0 * rows).reshape(rows, 3))


# ------------------------------------------------------------------------------------------------------- memory


def test_llama2_7b_on_v5p_64():
  r = memory.memory_report("llama-2-7b", {"fsdp": -1}, accelerator="v5p-64")
  assert r["devices"] == 32 and r["mesh"] == {"data": 1, "fsdp": 32, "tensor": 1}
  assert r["counts"]["params"] == 6_738_415_616  # the published LLaMA-2-7B size
  # Every LLaMA-2-7B matrix dim divides 32, so each device holds 1/32 of them (float32); the RMSNorm scales
  # (2 x [32, 4096] + [4096]) are replicated by rule.
  norms = 2 * 32 * 4096 + 4096
  assert r["per_device"]["params"] == (6_738_415_616 - norms) * 4 // 32 + norms * 4
  assert r["fallbacks"] == []
  assert r["per_device"]["moments"] == 2 * r["counts"]["trainable"] * 4 // 32
  # Bases: per matrix min(m//2, min(m,n)) + min(n//2, min(m,n)) columns; on 32 devices they split like the weights.
  assert r["per_device"]["bases"] == r["counts"]["basis"] * 4 // 32
  assert r["counts"]["basis"] < 1.15 * r["counts"]["constrained"]
  assert r["fits"] and r["hbm_per_device"] == 95 * 1024**3
  text = memory.format_memory_report(r)
  assert "llama-2-7b" in text and "subspace bases" in text and "fits" in text


def test_memory_dtypes_and_mesh_without_devices():
  r = memory.memory_report("t5-large", [2, 4, 2], dtype="bfloat16", moment_dtype="float32")
  assert r["devices"] == 16
  assert r["dtypes"] == {"params": "bfloat16", "moments": "float32", "bases": "float32"}
  # A rank cap of 0.8 gives the MLP bases 3277 columns, which fsdp=8 does not divide: reported, not hidden.
  r = memory.memory_report("llama-2-7b", {"fsdp": -1, "tensor": 4}, accelerator="v5p-64", max_rank_ratio=0.8)
  assert any("capacity 3277" in f and "gate_proj" in f for f in r["fallbacks"])
  with pytest.raises(ValueError, match="give devices=N"):
    memory.memory_report("t5-large", {"fsdp": -1})
  with pytest.raises(ValueError, match="unknown accelerator"):
    memory.memory_report("t5-large", {"fsdp": -1}, accelerator="v9-8")


@pytest.mark.parametrize("name,devices", [("v4-32", 16), ("v5p-64", 32), ("v5litepod-16", 16), ("v6e-8", 8),
                                          ("8xh100", 8), ("v3-8", 8)])
def test_accelerator_devices(name, devices):
  assert memory.accelerator_devices(name)[0] == devices


def test_shapes_match_transformers_parameter_counts(tmp_path):
  transformers = pytest.importorskip("transformers")
  llama = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  t5 = transformers.T5Config(vocab_size=96, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                             num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  for cfg, cls in ((llama, transformers.LlamaForCausalLM), (t5, transformers.T5ForConditionalGeneration)):
    cfg.save_pretrained(tmp_path / cfg.model_type)
    model = cls(cfg)
    want = sum(p.numel() for p in model.parameters())
    shapes = memory.model_shapes(str(tmp_path / cfg.model_type))
    assert sum(int(np.prod(s)) for s in shapes.values()) == want, cfg.model_type
    r = memory.memory_report(str(tmp_path / cfg.model_type), {"fsdp": 1})
    assert r["counts"]["params"] == want


def test_model_config_errors(tmp_path):
  with pytest.raises(ValueError, match="not a preset"):
    memory.load_model_config(str(tmp_path / "nowhere"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    memory.model_shapes(str(tmp_path))


def test_scaling_doc_example_runs():
  text = (Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text()
  code = text.split("```python\n", 1)[1].split("```", 1)[0]
  scope: dict = {}
  exec(compile(code, "docs/scaling.md", "exec"), scope)
  assert np.isfinite(float(scope["metrics"]["loss"]))
  # ``subs`` went into the donated optimizer state: read the subspaces back from the new state.
  sub = clsvd_jax.get_subspaces(scope["opt_state"])["layers"]["mlp"]["up_proj"]["weight"]
  assert np.asarray(sub.rank).tolist() == [8, 8, 8, 8]
  assert scope["boundary_bytes"] is None or scope["boundary_bytes"]["peak"] > 0


def test_boundary_program_is_compiled_once_per_layout():
  from clsvd_jax.parallel import boundary

  m = mesh.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (2, 12, 8))}
  first = boundary.compute_subspaces_sharded(params, {"w": 2}, mesh=m, max_rank_ratio=0.75)
  second = boundary.compute_subspaces_sharded(params, {"w": 5}, first, mesh=m)
  before = len(boundary._COMPILED)
  third = boundary.compute_subspaces_sharded(params, {"w": 6}, second, mesh=m)  # new ranks, same layout
  assert len(boundary._COMPILED) == before
  want = clsvd_jax.compute_subspaces(params, {"w": 2}, max_rank_ratio=0.75)
  for k in (5, 6):
    want = clsvd_jax.compute_subspaces(params, {"w": k}, want)
  for a, b in zip(jax.tree.leaves(third), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
