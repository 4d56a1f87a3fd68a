"""Hugging Face checkpoint directories: ``config.json`` + ``model.safetensors`` (or shards with an index).

Reading parses the safetensors headers ourselves and maps each file with ``numpy.memmap``: a tensor is a view of the
file until it is cast and copied, so a bfloat16 checkpoint is never expanded to float32 on the host, and with a
sharding each device copies only its own slice (``jax.make_array_from_callback``). bfloat16 and float8 come from
``ml_dtypes`` (a jax dependency).

Writing produces files that ``safetensors.torch.load_file`` and transformers' ``from_pretrained`` read (header
metadata ``{"format": "pt"}``), one ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` when ``max_shard_size`` asks for it.

The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw data, offsets
relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

__all__ = [
  "CheckpointError", "CheckpointReader", "MissingTensorError", "write_checkpoint", "parse_size", "SAFETENSORS_DTYPES",
]

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag -> numpy dtype.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read as asked (the message names the file and tensor)."""


class MissingTensorError(CheckpointError, KeyError):
  """A tensor the model needs is not in the checkpoint."""

  def __str__(self) -> str:  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


class _File:
  """One safetensors file: its header and a lazily created read-only memory map of its data."""

  def __init__(self, path: Path):
    self.path = path
    try:
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8:
          raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
        header = json.loads(f.read(n))
    except OSError as e:
      raise CheckpointError(f"{path}: cannot read the safetensors file ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self.entries: dict[str, dict[str, Any]] = header
    self.data_start = 8 + n
    self.size = size
    self._map: np.memmap | None = None

  def _buffer(self) -> np.ndarray:
    if self._map is None:
      length = self.size - self.data_start
      if length == 0:
        return np.zeros((0,), np.uint8)
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start, shape=(length,))
    return self._map

  def array(self, name: str) -> np.ndarray:
    """A read-only view of the tensor (no copy)."""
    entry = self.entries[name]
    tag = entry["dtype"]
    if tag not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {tag}, which this reader does not support "
                            f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    dtype = SAFETENSORS_DTYPES[tag]
    shape = tuple(int(s) for s in entry["shape"])
    begin, end = (int(o) for o in entry["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize or end > self.size - self.data_start:
      raise CheckpointError(f"{self.path}: tensor {name!r} is corrupt (data_offsets {entry['data_offsets']} do not "
                            f"fit shape {list(shape)} of {tag} in a file of {self.size} bytes)")
    return self._buffer()[begin:end].view(dtype).reshape(shape)


class CheckpointReader:
  """Reads a Hugging Face checkpoint directory.

  Attributes:
    path: the directory.
    config: the parsed ``config.json``.
    files: the safetensors files, in order.

  Raises (on construction):
    CheckpointError: the directory does not exist, has no ``config.json``, a broken one, no safetensors weights, or
      an index naming a missing shard; the message names the file and what to do.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path).expanduser()
    if not self.path.is_dir():
      raise CheckpointError(f"{self.path}: not a directory; pass a Hugging Face checkpoint directory holding "
                            f"{CONFIG_NAME} and {SINGLE_FILE} (or sharded safetensors with {INDEX_FILE})")
    config_path = self.path / CONFIG_NAME
    if not config_path.is_file():
      raise CheckpointError(f"{config_path}: missing; a checkpoint directory needs {CONFIG_NAME} (the Hugging Face "
                            "model config) next to its safetensors files")
    try:
      self.config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{config_path}: cannot parse it as JSON ({e})") from None
    if not isinstance(self.config, dict):
      raise CheckpointError(f"{config_path}: expected a JSON object, got {type(self.config).__name__}")
    self.config_path = config_path
    self._where: dict[str, _File] = {}
    self.files: list[_File] = []
    index = self.path / INDEX_FILE
    if index.is_file():
      self._read_index(index)
    elif (self.path / SINGLE_FILE).is_file():
      self._add(_File(self.path / SINGLE_FILE))
    else:
      found = sorted(p.name for p in self.path.glob("*.safetensors"))
      if not found:
        hint = " (PyTorch .bin weights are not read: re-save with safe_serialization)" if any(
            self.path.glob("*.bin")) else ""
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} nor {INDEX_FILE}{hint}; save the model with "
                              "save_pretrained (safetensors) into this directory")
      for name in found:
        self._add(_File(self.path / name))

  def _read_index(self, index: Path) -> None:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from None
    opened: dict[str, _File] = {}
    for tensor, fname in weight_map.items():
      if fname not in opened:
        fpath = self.path / fname
        if not fpath.is_file():
          raise CheckpointError(f"{index}: shard {fname!r} (holding tensor {tensor!r}) is missing from {self.path}")
        opened[fname] = _File(fpath)
        self.files.append(opened[fname])
      if tensor not in opened[fname].entries:
        raise MissingTensorError(f"{index} maps tensor {tensor!r} to {fname}, which does not contain it")
      self._where[tensor] = opened[fname]

  def _add(self, f: _File) -> None:
    self.files.append(f)
    for name in f.entries:
      self._where[name] = f

  # ----------------------------------------------------------------------------------------------------------------

  def keys(self) -> list[str]:
    """Names of all tensors, in file order."""
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def _source(self) -> str:
    if len(self.files) == 1:
      return str(self.files[0].path)
    return f"{self.path} ({INDEX_FILE if (self.path / INDEX_FILE).is_file() else '*.safetensors'})"

  def _file(self, name: str) -> _File:
    try:
      return self._where[name]
    except KeyError:
      raise MissingTensorError(f"{self._source()}: tensor {name!r} is missing from the checkpoint (it has "
                               f"{len(self._where)} tensors); the checkpoint does not match its "
                               f"{CONFIG_NAME}") from None

  def file_of(self, name: str) -> Path:
    """The file holding a tensor."""
    return self._file(name).path

  def shape(self, name: str) -> tuple[int, ...]:
    """The stored shape of a tensor."""
    return tuple(int(s) for s in self._file(name).entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    """The stored numpy dtype of a tensor (``ml_dtypes.bfloat16`` for BF16)."""
    tag = self._file(name).entries[name]["dtype"]
    if tag not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has unsupported dtype {tag}")
    return SAFETENSORS_DTYPES[tag]

  def numpy(self, name: str, *, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """A read-only host view of a tensor in its stored dtype (no copy)."""
    self._check_shape(name, expected_shape)
    return self._file(name).array(name)

  def _check_shape(self, name: str, expected_shape: Sequence[int] | None) -> None:
    if expected_shape is None:
      return
    have, want = self.shape(name), tuple(int(s) for s in expected_shape)
    if have != want:
      raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has shape {list(have)} but the model built from "
                            f"{self.config_path} expects {list(want)}; the checkpoint and its config disagree")

  def get(self, name: str, *, dtype: Any = None, sharding: jax.sharding.Sharding | None = None,
          expected_shape: Sequence[int] | None = None) -> jax.Array:
    """A tensor as a device array.

    Args:
      name: the tensor's name in the checkpoint.
      dtype: cast to this dtype (per device slice, from the stored dtype; None keeps the stored one).
      sharding: place the array with this sharding; each device reads only its slice of the file.
      expected_shape: raise a ``CheckpointError`` naming file and tensor when the stored shape differs.

    Raises:
      MissingTensorError: the tensor is not in the checkpoint.
      CheckpointError: wrong shape, unsupported dtype or corrupt file.
    """
    view = self.numpy(name, expected_shape=expected_shape)
    target = view.dtype if dtype is None else np.dtype(dtype)

    def host(index: Any = ()) -> np.ndarray:
      # astype copies (also when the dtype is unchanged), turning the file view into an owned, aligned buffer.
      return np.asarray(view[index]).astype(target, copy=True)

    if sharding is None:
      return jax.device_put(host())
    return jax.make_array_from_callback(view.shape, sharding, host)


  def get_stacked(self, names: Sequence[str], *, dtype: Any = None, sharding: jax.sharding.Sharding | None = None,
                  expected_shape: Sequence[int] | None = None) -> jax.Array:
    """Tensors of equal shape stacked on a new leading axis (per-block tensors -> one ``[L, ...]`` array).

    Each device's slice is assembled on the host straight from the files (no device-side stacking, so no
    device ever holds two copies), e.g. ``get_stacked([f"model.layers.{i}.mlp.up_proj.weight" for i in
    range(L)], sharding=NamedSharding(mesh, P(None, "tensor", "fsdp")))``.

    Args:
      names: the tensors, in stacking order.
      dtype, sharding: as in ``get``; the sharding is that of the stacked array.
      expected_shape: the shape of ONE tensor (errors name the offending file and tensor).
    """
    if not names:
      raise ValueError("get_stacked needs at least one tensor name")
    views = [self.numpy(n, expected_shape=expected_shape) for n in names]
    shape0 = views[0].shape
    for n, v in zip(names, views):
      if v.shape != shape0:
        raise CheckpointError(f"{self.file_of(n)}: tensor {n!r} has shape {list(v.shape)} but {names[0]!r} has "
                              f"{list(shape0)}; per-layer tensors of one kind must agree")
    target = views[0].dtype if dtype is None else np.dtype(dtype)
    shape = (len(views), *shape0)

    def host(index: Any = ()) -> np.ndarray:
      index = tuple(index) if isinstance(index, tuple) else (index,)
      first, rest = (index[0], index[1:]) if index else (slice(None), ())
      rows = range(len(views))[first]
      out = np.empty((len(rows), *_sliced_shape(shape0, rest)), target)
      for j, i in enumerate(rows):
        out[j] = views[i][rest]
      return out

    if sharding is None:
      return jax.device_put(host())
    return jax.make_array_from_callback(shape, sharding, host)


def _sliced_shape(shape: Sequence[int], index: tuple[Any, ...]) -> tuple[int, ...]:
  """The shape of ``x[index]`` for an array of ``shape`` and an index of slices."""
  out = []
  for dim, size in enumerate(shape):
    if dim < len(index):
      out.append(len(range(size)[index[dim]]))
    else:
      out.append(size)
  return tuple(out)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like ``"5GB"``, ``"200KB"``, ``"1.5GiB"`` (Hugging Face's units)."""
  if isinstance(size, int | np.integer) and not isinstance(size, bool):
    if size <= 0:
      raise ValueError(f"max_shard_size must be positive, got {size}")
    return int(size)
  m = _SIZE.match(str(size))
  if not m or (m.group(2) or "").upper() not in _UNITS:
    raise ValueError(f"max_shard_size={size!r}: expected bytes (int) or a string like '5GB', '200MB', '1GiB'")
  out = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
  if out <= 0:
    raise ValueError(f"max_shard_size must be positive, got {size!r}")
  return out


def _to_host(name: str, value: Any) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils

    value = multihost_utils.process_allgather(value, tiled=True)
  arr = np.asarray(value)
  if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    arr = arr.copy(order="C")
  if arr.dtype not in _TAGS:
    raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
  return arr


def _write_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, arr in tensors.items():
    header[name] = {"dtype": _TAGS[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in tensors.values():
      f.write(arr.tobytes())
  tmp.replace(path)


def write_checkpoint(path: str | Path, tensors: Mapping[str, Any], config: Mapping[str, Any], *,
                     max_shard_size: int | str | None = None) -> list[Path]:
  """Writes a Hugging Face checkpoint directory.

  Args:
    path: the directory (created if needed). Stale ``model*.safetensors`` / index files there are removed first so
      the directory never mixes two checkpoints.
    tensors: ``{hf_name: array}`` (numpy or jax; sharded jax arrays are gathered).
    config: the ``config.json`` dict.
    max_shard_size: None writes one ``model.safetensors``; otherwise shards of at most this many bytes (int or
      ``"5GB"``-style string; a tensor larger than the limit gets a shard of its own) plus
      ``model.safetensors.index.json``.

  Returns:
    The safetensors files written.
  """
  out = Path(path).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
    if stale.exists():
      stale.unlink()
  arrays = {name: _to_host(name, v) for name, v in tensors.items()}
  (out / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
  if max_shard_size is None:
    _write_file(out / SINGLE_FILE, arrays)
    return [out / SINGLE_FILE]
  limit = parse_size(max_shard_size)
  groups: list[dict[str, np.ndarray]] = [{}]
  used = 0
  for name, arr in arrays.items():
    if groups[-1] and used + arr.nbytes > limit:
      groups.append({})
      used = 0
    groups[-1][name] = arr
    used += arr.nbytes
  if len(groups) == 1:
    _write_file(out / SINGLE_FILE, arrays)
    return [out / SINGLE_FILE]
  files, weight_map = [], {}
  for i, group in enumerate(groups, start=1):
    fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
    _write_file(out / fname, group)
    files.append(out / fname)
    weight_map.update(dict.fromkeys(group, fname))
  total = sum(a.nbytes for a in arrays.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return files
