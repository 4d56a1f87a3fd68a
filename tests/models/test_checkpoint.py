"""Checkpoint files: our safetensors reader and writer against the reference library (numpy and torch), shards with
an index, dtypes (bf16 stays bf16), sharded reads on 4 CPU devices, and every error naming file and tensor."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from clsvd_jax.models import CheckpointError, CheckpointReader, MissingTensorError, write_checkpoint
from clsvd_jax.models.checkpoint import parse_size

CONFIG = {"model_type": "llama", "hidden_size": 8}


def _tensors():
  rng = np.random.RandomState(0)
  return {
    "a.weight": rng.randn(6, 4).astype(np.float32),
    "b.bf16": rng.randn(3, 5).astype(ml_dtypes.bfloat16),
    "c.half": rng.randn(7).astype(np.float16),
    "d.ids": np.arange(10, dtype=np.int64).reshape(2, 5),
    "e.flag": np.array([True, False, True]),
    "f.scalar": np.array(3.5, np.float32),
    "g.jax": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4),
  }


def test_round_trip_all_dtypes_and_reference_readers(tmp_path):
  tensors = _tensors()
  files = write_checkpoint(tmp_path, tensors, CONFIG)
  assert files == [tmp_path / "model.safetensors"]
  assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
  reader = CheckpointReader(tmp_path)
  assert reader.config == CONFIG and reader.keys() == list(tensors)
  for name, value in tensors.items():
    value = np.asarray(value)
    assert reader.shape(name) == value.shape and reader.dtype(name) == value.dtype
    got = reader.get(name)
    # int64 becomes int32 unless jax runs with x64, as for any jax array.
    assert got.dtype == jax.dtypes.canonicalize_dtype(value.dtype) and isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), value)
  # bf16 is read as bf16 (a view of the file, no float32 copy); casting happens only when asked.
  view = reader.numpy("b.bf16")
  assert view.dtype == ml_dtypes.bfloat16 and not view.flags.owndata
  assert reader.get("b.bf16", dtype=jnp.float32).dtype == jnp.float32
  assert reader.get("a.weight", dtype=jnp.bfloat16).dtype == jnp.bfloat16
  # The reference library reads what we wrote, with the metadata transformers requires.
  with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
  back = torch_load_file(tmp_path / "model.safetensors")
  assert back["b.bf16"].dtype == torch.bfloat16 and back["d.ids"].dtype == torch.int64
  np.testing.assert_array_equal(back["b.bf16"].float().numpy(), np.asarray(tensors["b.bf16"], np.float32))
  np.testing.assert_array_equal(back["a.weight"].numpy(), tensors["a.weight"])
  np.testing.assert_array_equal(back["e.flag"].numpy(), tensors["e.flag"])
  # numpy has no bfloat16: the numpy reader gets the other dtypes.
  plain = {k: tensors[k] for k in ("a.weight", "c.half", "d.ids", "e.flag", "f.scalar")}
  write_checkpoint(tmp_path / "np", plain, CONFIG)
  for name, value in load_file(tmp_path / "np" / "model.safetensors").items():
    assert value.dtype == plain[name].dtype
    np.testing.assert_array_equal(value, plain[name])


def test_reads_files_written_by_the_reference(tmp_path):
  ref = {"x": torch.randn(4, 3).to(torch.bfloat16), "y": torch.arange(6, dtype=torch.int32)}
  torch_save_file(ref, tmp_path / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "config.json").write_text("{}")
  reader = CheckpointReader(tmp_path)
  assert reader.dtype("x") == ml_dtypes.bfloat16
  np.testing.assert_array_equal(np.asarray(reader.get("x"), np.float32), ref["x"].float().numpy())
  np.testing.assert_array_equal(np.asarray(reader.get("y")), ref["y"].numpy())


def test_sharded_write_and_read(tmp_path):
  tensors = {f"t{i}": np.full((100,), i, np.float32) for i in range(5)}  # 400 bytes each
  tensors["big"] = np.ones((300,), np.float32)  # 1200 bytes: more than a shard, gets its own
  files = write_checkpoint(tmp_path, tensors, CONFIG, max_shard_size=1000)
  assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 5 * 400 + 1200
  assert index["weight_map"] == {"t0": files[0].name, "t1": files[0].name, "t2": files[1].name,
                                 "t3": files[1].name, "t4": files[2].name, "big": files[3].name}
  reader = CheckpointReader(tmp_path)
  assert sorted(reader.keys()) == sorted(tensors) and reader.file_of("t3") == files[1]
  for name, value in tensors.items():
    np.testing.assert_array_equal(np.asarray(reader.get(name)), value)
  # Writing again unsharded replaces the shards (the directory never mixes two checkpoints).
  write_checkpoint(tmp_path, tensors, CONFIG, max_shard_size="1GB")
  assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
  assert CheckpointReader(tmp_path).keys() == list(tensors)


def test_get_stacked(tmp_path):
  layers = [np.random.RandomState(i).randn(3, 4).astype(np.float32) for i in range(3)]
  write_checkpoint(tmp_path, {f"l.{i}.w": w for i, w in enumerate(layers)}, CONFIG)
  reader = CheckpointReader(tmp_path)
  names = [f"l.{i}.w" for i in range(3)]
  stacked = reader.get_stacked(names, dtype=jnp.bfloat16, expected_shape=(3, 4))
  assert stacked.shape == (3, 3, 4) and stacked.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(stacked), np.stack(layers).astype(ml_dtypes.bfloat16))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'l\.0\.w' has shape \[3, 4\] but .* "
                     r"expects \[4, 3\]"):
    reader.get_stacked(names, expected_shape=(4, 3))
  with pytest.raises(MissingTensorError, match=r"tensor 'l\.7\.w' is missing"):
    reader.get_stacked(names + ["l.7.w"])


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("5GB", 5 * 10**9), ("200KB", 200_000),
                                            ("1GiB", 2**30), ("1.5MB", 1_500_000), ("42", 42)])
def test_parse_size(size, expected):
  assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "-3", 0, "GB"])
def test_parse_size_rejects(size):
  with pytest.raises(ValueError, match="max_shard_size"):
    parse_size(size)


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
  write_checkpoint(tmp_path / "ck", {"w": np.zeros((2, 3), np.float32)}, CONFIG)
  return tmp_path / "ck"


def test_error_not_a_directory(tmp_path):
  with pytest.raises(CheckpointError, match=r"nowhere: not a directory; pass a Hugging Face checkpoint directory"):
    CheckpointReader(tmp_path / "nowhere")


def test_error_missing_or_broken_config(ckpt):
  (ckpt / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match=r"ck/config\.json: cannot parse it as JSON"):
    CheckpointReader(ckpt)
  (ckpt / "config.json").write_text("[1, 2]")
  with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
    CheckpointReader(ckpt)
  (ckpt / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"ck/config\.json: missing"):
    CheckpointReader(ckpt)


def test_error_no_weights(ckpt):
  (ckpt / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match=r"ck: no model\.safetensors nor model\.safetensors\.index\.json;"):
    CheckpointReader(ckpt)
  (ckpt / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(CheckpointError, match=r"\.bin weights are not read"):
    CheckpointReader(ckpt)


def test_error_index_names_missing_shard(ckpt):
  index = {"metadata": {}, "weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}}
  (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=r"index\.json: shard 'model-00002-of-00002\.safetensors' \(holding "
                     r"tensor 'v'\) is missing"):
    CheckpointReader(ckpt)
  index["weight_map"] = {"w": "model.safetensors", "v": "model.safetensors"}
  (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(MissingTensorError, match=r"maps tensor 'v' to model\.safetensors, which does not contain it"):
    CheckpointReader(ckpt)


def test_error_missing_tensor_and_wrong_shape(ckpt):
  reader = CheckpointReader(ckpt)
  with pytest.raises(KeyError) as err:  # a KeyError too, for callers that expect one
    reader.get("nope")
  assert str(err.value).startswith(str(ckpt / "model.safetensors")) and "'nope' is missing" in str(err.value)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w' has shape \[2, 3\] but the model built "
                     r"from .*config\.json expects \[3, 2\]"):
    reader.get("w", expected_shape=(3, 2))


def test_error_corrupt_file(ckpt):
  path = ckpt / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-4])  # truncated data
  reader = CheckpointReader(ckpt)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w' is corrupt"):
    reader.get("w")
  path.write_bytes(b"\xff" * 16)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
    CheckpointReader(ckpt)


def test_sharded_reads_on_four_cpu_devices(tmp_path):
  """Reads onto a 2 x 2 mesh of 4 of the suite's 8 host devices (tests/conftest.py): each device gets its slice."""
  layers = {f"l.{i}.w": np.random.RandomState(i).randn(8, 6).astype(ml_dtypes.bfloat16) for i in range(4)}
  write_checkpoint(tmp_path, layers, CONFIG, max_shard_size=200)  # one tensor per shard
  reader = CheckpointReader(tmp_path)
  mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), devices=jax.devices()[:4])
  full = np.stack([reader.numpy(f"l.{i}.w") for i in range(4)])
  w = reader.get("l.1.w", dtype=np.float32, sharding=NamedSharding(mesh, P("tensor", "fsdp")))
  assert w.addressable_shards[0].data.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(w), full[1].astype(np.float32))
  s = reader.get_stacked([f"l.{i}.w" for i in range(4)], sharding=NamedSharding(mesh, P("fsdp", None, "tensor")))
  assert s.shape == (4, 8, 6) and s.addressable_shards[0].data.shape == (2, 8, 3) and s.dtype == full.dtype
  np.testing.assert_array_equal(np.asarray(s).astype(np.float32), full.astype(np.float32))
