"""Bytes per device of parameters, gradients, Adam moments and subspace bases for a model on a mesh.

Pure arithmetic over shapes and the partition rules (no devices needed), so it answers "does LLaMA-2-7B fit on a
v5p-64?" from a laptop: ``clsvd inspect --memory CONFIG`` calls ``memory_report`` and prints
``format_memory_report``. Activations are not counted (they depend on batch, sequence length and remat).

Training keeps float32 master weights (docs/design.md §6b): ``dtype`` is the dtype of the parameters the optimizer
updates, and a run with bf16 compute (``training.bf16_compute``) holds, inside the step, a bf16 copy of the
parameters on top of them (``compute_dtype``; counted as ``compute_copy``). A config's ``model.dtype: bfloat16``
saves nothing here: it is the precision the checkpoint is read in, and the weights are then cast to float32.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clsvd_jax._src.param_policy import CONSTRAIN, TRAIN, ParamPolicy
from clsvd_jax._src.subspace import default_capacity
from clsvd_jax.parallel import rules as rules_lib
from clsvd_jax.parallel.mesh import AXES, resolve_mesh_shape
from clsvd_jax.parallel.opt_state import subspace_specs

GiB = 1024**3

# Hugging Face config.json fields of a few common checkpoints, so no download is needed for an estimate.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False),
    # LLaMA-3.1 changes the rope scaling, not the shapes.
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False),
    "t5-base": dict(model_type="t5", vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12,
                    num_layers=12, num_decoder_layers=12, relative_attention_num_buckets=32,
                    feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-large": dict(model_type="t5", vocab_size=32128, d_model=1024, d_ff=4096, d_kv=64, num_heads=16,
                     num_layers=24, num_decoder_layers=24, relative_attention_num_buckets=32,
                     feed_forward_proj="relu", tie_word_embeddings=True),
    "flan-t5-large": dict(model_type="t5", vocab_size=32128, d_model=1024, d_ff=2816, d_kv=64, num_heads=16,
                          num_layers=24, num_decoder_layers=24, relative_attention_num_buckets=32,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}

# JAX devices per accelerator type and memory per device. TPU v4 / v5p names count TensorCores (2 per chip, one
# JAX device per chip); v5e / v6e names count chips; v2 / v3 expose each core as a device.
_TPU_HBM = {"v2": 8 * GiB, "v3": 16 * GiB, "v4": 32 * GiB, "v5p": 95 * GiB, "v5e": 16 * GiB, "v5litepod": 16 * GiB,
            "v6e": 32 * GiB}
_GPU_HBM = {"a100": 80 * 10**9, "a100-40gb": 40 * 10**9, "h100": 80 * 10**9, "h200": 141 * 10**9,
            "l4": 24 * 10**9, "a10g": 24 * 10**9, "b200": 180 * 10**9}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1}


def accelerator_devices(accelerator: str) -> tuple[int, int]:
  """``(jax devices, bytes per device)`` of an accelerator type: ``v4-32``, ``v5p-64``, ``v5litepod-16``,
  ``v6e-8``, ``8xh100`` ...

  Raises:
    ValueError: for a name it does not know, listing the forms it does.
  """
  name = accelerator.strip().lower()
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if m:
    gen, count = m.group(1), int(m.group(2))
    devices = count // 2 if gen in ("v4", "v5p") else count
    return max(devices, 1), _TPU_HBM[gen]
  m = re.fullmatch(r"(\d+)x([a-z0-9-]+)", name)
  if m and m.group(2) in _GPU_HBM:
    return int(m.group(1)), _GPU_HBM[m.group(2)]
  raise ValueError(f"unknown accelerator {accelerator!r}; use a TPU type like v4-32, v5p-64, v5litepod-16, v6e-8 "
                   f"or N x GPU like 8xh100 (GPUs: {sorted(_GPU_HBM)})")


def load_model_config(model_config: Any) -> dict[str, Any]:
  """A Hugging Face style config dict from a preset name, a ``config.json`` path / checkpoint directory, a dict,
  or an object with ``to_dict()`` (a transformers config)."""
  if isinstance(model_config, Mapping):
    return dict(model_config)
  if hasattr(model_config, "to_dict"):
    return dict(model_config.to_dict())
  if isinstance(model_config, str | os.PathLike):
    text = os.fspath(model_config)
    if text.lower() in PRESETS:
      return dict(PRESETS[text.lower()], name=text.lower())
    path = os.path.join(text, "config.json") if os.path.isdir(text) else text
    if os.path.isfile(path):
      with open(path) as f:
        cfg = json.load(f)
      cfg.setdefault("name", os.path.basename(os.path.dirname(os.path.abspath(path))))
      return cfg
    preset = _preset_for_folder(text)
    if preset is not None:
      # A config's checkpoint folder that is not on this machine: its name says which preset it is.
      return dict(PRESETS[preset], name=f"{preset} (preset; {text} not found)")
    raise ValueError(f"model config {text!r}: not a preset ({', '.join(PRESETS)}) and no config.json there")
  raise ValueError(f"model config must be a preset name, a path or a dict; got {type(model_config).__name__}")


def _preset_for_folder(path: str) -> str | None:
  """The preset a checkpoint folder's name stands for (``.../Llama-2-7b-hf`` -> ``llama-2-7b``), if any."""
  name = os.path.basename(os.path.normpath(path)).lower()
  name = name.removesuffix("-hf")
  return name if name in PRESETS else None


def _field(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
  for n in names:
    if cfg.get(n) is not None:
      return cfg[n]
  if default is not None:
    return default
  raise ValueError(f"model config lacks {names[0]!r} (model_type {cfg.get('model_type')!r})")


def model_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of every parameter of a LLaMA or T5 model, in the project's layout (stacked layers)."""
  cfg = load_model_config(model_config)
  kind = str(cfg.get("model_type", "")).lower()
  if kind in ("llama", "mistral", "qwen2"):
    v, d, f = _field(cfg, "vocab_size"), _field(cfg, "hidden_size"), _field(cfg, "intermediate_size")
    n_layers, h = _field(cfg, "num_hidden_layers"), _field(cfg, "num_attention_heads")
    kv = _field(cfg, "num_key_value_heads", default=h)
    hd = _field(cfg, "head_dim", default=d // h)
    nl = n_layers
    s = {"embed_tokens/embedding": (v, d), "layers/input_layernorm/scale": (nl, d),
         "layers/self_attn/q_proj/weight": (nl, h * hd, d), "layers/self_attn/k_proj/weight": (nl, kv * hd, d),
         "layers/self_attn/v_proj/weight": (nl, kv * hd, d), "layers/self_attn/o_proj/weight": (nl, d, h * hd),
         "layers/post_attention_layernorm/scale": (nl, d), "layers/mlp/gate_proj/weight": (nl, f, d),
         "layers/mlp/up_proj/weight": (nl, f, d), "layers/mlp/down_proj/weight": (nl, d, f), "norm/scale": (d,)}
    if cfg.get("attention_bias"):
      for name, out in (("q", h * hd), ("k", kv * hd), ("v", kv * hd), ("o", d)):
        s[f"layers/self_attn/{name}_proj/bias"] = (n_layers, out)
    if cfg.get("mlp_bias"):
      s.update({"layers/mlp/gate_proj/bias": (n_layers, f), "layers/mlp/up_proj/bias": (n_layers, f),
                "layers/mlp/down_proj/bias": (n_layers, d)})
    if not cfg.get("tie_word_embeddings", False):
      s["lm_head/weight"] = (v, d)
    return s
  if kind in ("t5", "mt5", "umt5"):
    v, d, f = _field(cfg, "vocab_size"), _field(cfg, "d_model"), _field(cfg, "d_ff")
    h, dkv = _field(cfg, "num_heads"), _field(cfg, "d_kv")
    n_enc = _field(cfg, "num_layers")
    n_dec = _field(cfg, "num_decoder_layers", default=n_enc)
    buckets = _field(cfg, "relative_attention_num_buckets", default=32)
    gated = str(cfg.get("feed_forward_proj", "relu")).startswith("gated")
    inner = h * dkv
    s = {"shared/embedding": (v, d)}
    for stack, n_layers in (("encoder", n_enc), ("decoder", n_dec)):
      attns = ("self_attn", "cross_attn") if stack == "decoder" else ("self_attn",)
      for attn in attns:
        for name in ("q", "k", "v"):
          s[f"{stack}/layers/{attn}/{name}/weight"] = (n_layers, inner, d)
        s[f"{stack}/layers/{attn}/o/weight"] = (n_layers, d, inner)
        s[f"{stack}/layers/{attn}_norm/scale"] = (n_layers, d)
      for name in ("wi_0", "wi_1") if gated else ("wi",):
        s[f"{stack}/layers/mlp/{name}/weight"] = (n_layers, f, d)
      s[f"{stack}/layers/mlp/wo/weight"] = (n_layers, d, f)
      s[f"{stack}/layers/mlp_norm/scale"] = (n_layers, d)
      s[f"{stack}/relative_attention_bias/embedding"] = (buckets, h)
      s[f"{stack}/final_norm/scale"] = (d,)
    if not cfg.get("tie_word_embeddings", True):
      s["lm_head/weight"] = (v, d)
    return s
  raise ValueError(f"model config: model_type {cfg.get('model_type')!r} is not supported for memory estimates; "
                   "expected llama or t5")


def _name(dtype: Any) -> str:
  return np.dtype(dtype).name if not isinstance(dtype, str) else dtype.lower()


def _bytes(dtype: Any) -> int:
  name = _name(dtype)
  if name not in _DTYPE_BYTES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
  return _DTYPE_BYTES[name]


def _shard_elems(shape: Sequence[int], spec: Any, sizes: Mapping[str, int]) -> int:
  """Elements one device holds of an array with ``spec`` (the largest shard where sizes do not divide)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  total = 1
  for dim, entry in zip(shape, entries):
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    parts = int(np.prod([sizes[a] for a in axes])) if axes else 1
    total *= math.ceil(dim / parts)
  return total


def spec_tail(spec: Any, ndim: int, dim: int) -> Any:
  """Entry ``dim`` of a PartitionSpec padded to ``ndim`` dims."""
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  return entries[dim]


def memory_report(model_config: Any, mesh_shape: Mapping[str, int] | Sequence[int] | None = None,
                  dtype: Any = "float32", *, moment_dtype: Any = None, basis_dtype: Any = "float32",
                  compute_dtype: Any = None,
                  devices: int | None = None, accelerator: str | None = None, policy: ParamPolicy | None = None,
                  max_rank_ratio: float = 1.0, rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES,
                  axis_map: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Per-device bytes of a training state on a mesh.

  Args:
    model_config: a preset (``llama-2-7b``, ``t5-large``, ...), a ``config.json`` path / HF checkpoint directory,
      or a config dict.
    mesh_shape: ``{data, fsdp, tensor}`` sizes (-1 = the rest of the devices; default all on fsdp).
    dtype: dtype of the parameters the optimizer updates (the master weights) and of their gradients.
    moment_dtype: dtype of Adam's two moments (default: the parameter dtype, as optax does).
    basis_dtype: dtype of the subspace bases (``compute_subspaces``' default float32).
    compute_dtype: dtype of the forward and backward pass when it differs from ``dtype`` (``bfloat16`` with
      ``bf16_compute``): the step then holds a copy of every parameter in it (``per_device["compute_copy"]``).
    devices: number of devices; default from ``accelerator``, else the product of ``mesh_shape``.
    accelerator: e.g. ``v5p-64``: gives the device count and the memory per device to compare with.
    policy: which parameters are constrained / trained (moments) / frozen (default ``ParamPolicy()``: attention and
      MLP matrices constrained, the rest frozen).
    max_rank_ratio: the rank cap the bases are sized for (``default_capacity``).
    rules, axis_map: partition rules, see ``clsvd_jax.parallel.rules``.

  Returns:
    A dict with ``model``, ``mesh``, ``devices``, ``dtypes``, ``counts`` (elements), ``total_bytes`` (whole
    state, unsharded), ``per_device`` bytes (``params``, ``compute_copy``, ``grads``, ``moments``, ``bases``,
    ``total``, ``boundary_svd``: an estimate of the task-boundary decomposition's working set), ``compute_dtype``,
    ``hbm_per_device`` and ``fits`` when the accelerator is known, and ``fallbacks`` (dims left replicated).
  """
  cfg = load_model_config(model_config)
  shapes = model_shapes(cfg)
  hbm = None
  if accelerator is not None:
    acc_devices, hbm = accelerator_devices(accelerator)
    devices = devices or acc_devices
  if devices is None:
    sizes_given = list(mesh_shape.values()) if isinstance(mesh_shape, Mapping) else list(mesh_shape or [])
    if not sizes_given or any(s == -1 for s in sizes_given):
      raise ValueError("memory_report: give devices=N or accelerator=... when the mesh has a -1 axis")
    devices = int(np.prod(sizes_given))
  sizes = dict(zip(AXES, resolve_mesh_shape(mesh_shape, devices)))
  policy = policy or ParamPolicy()
  p_bytes, m_bytes, b_bytes = _bytes(dtype), _bytes(moment_dtype or dtype), _bytes(basis_dtype)
  # A compute dtype equal to the parameters' needs no copy.
  compute = None if compute_dtype is None or _name(compute_dtype) == _name(dtype) else _name(compute_dtype)
  c_bytes = _bytes(compute) if compute is not None else 0
  notes: list[rules_lib.Fallback] = []
  counts = dict(params=0, trainable=0, constrained=0, basis=0)
  per = dict(params=0, compute_copy=0, grads=0, moments=0, bases=0)
  boundary = 0
  for path, shape in shapes.items():
    spec = rules_lib.spec_for(path, shape, sizes, rules, axis_map=axis_map, notes=notes)
    n, local = int(np.prod(shape)), _shard_elems(shape, spec, sizes)
    counts["params"] += n
    per["params"] += local * p_bytes
    per["compute_copy"] += local * c_bytes
    action = policy.action(path)
    if action in (CONSTRAIN, TRAIN):
      counts["trainable"] += n
      per["grads"] += local * p_bytes
      per["moments"] += 2 * local * m_bytes
    if action == CONSTRAIN and len(shape) >= 2:
      counts["constrained"] += n
      *batch, rows, cols = shape
      c_left, c_right = default_capacity(rows, cols, max_rank_ratio)
      sub = subspace_specs(spec, tuple(shape), (c_left, c_right), sizes)
      for side, c, want, got in (("left", c_left, spec_tail(spec, len(shape), -1), sub.left[-1]),
                                 ("right", c_right, spec_tail(spec, len(shape), -2), sub.right[-1])):
        if want is not None and got is None:
          notes.append(rules_lib.Fallback(path, None, None, (), f"{side} basis capacity {c} does not divide the "
                                          f"axes {want}: its columns are replicated (pick a rank cap whose capacity "
                                          "divides them)"))
      for bshape, bspec in ((tuple(batch) + (rows, c_left), sub.left), (tuple(batch) + (cols, c_right), sub.right)):
        counts["basis"] += int(np.prod(bshape))
        per["bases"] += _shard_elems(bshape, bspec, sizes) * b_bytes
      # Layer-sharded boundary: each device decomposes ceil(L / devices) whole matrices in float32; working set
      # ~ W, R = P(W), its SVD factors and the two side projectors.
      n_mat = int(np.prod(batch)) if batch else 1
      r = min(rows, cols)
      work = 2 * rows * cols + rows * r + r * cols + rows * rows + cols * cols
      boundary = max(boundary, math.ceil(n_mat / devices) * work * 4)
  per["total"] = per["params"] + per["compute_copy"] + per["grads"] + per["moments"] + per["bases"]
  per["boundary_svd"] = boundary
  report = {
      "model": cfg.get("name", cfg.get("_name_or_path", cfg.get("model_type"))),
      "mesh": sizes, "devices": devices, "accelerator": accelerator,
      "dtypes": {"params": str(dtype), "moments": str(moment_dtype or dtype), "bases": str(basis_dtype)},
      "compute_dtype": compute or str(dtype),
      "max_rank_ratio": max_rank_ratio, "counts": counts,
      "total_bytes": {"params": counts["params"] * p_bytes, "moments": 2 * counts["trainable"] * m_bytes,
                      "bases": counts["basis"] * b_bytes},
      "per_device": per, "fallbacks": [str(n) for n in notes],
  }
  if hbm is not None:
    report["hbm_per_device"] = hbm
    report["fits"] = per["total"] + per["boundary_svd"] <= hbm
  return report


def format_memory_report(report: Mapping[str, Any]) -> str:
  """A readable table of ``memory_report``'s result (GiB per device)."""
  mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items())
  acc = f" ({report['accelerator']})" if report.get("accelerator") else ""
  c, per, dt = report["counts"], report["per_device"], report["dtypes"]
  lines = [
      f"model {report['model']}: {c['params'] / 1e9:.3f} B parameters, {c['constrained'] / 1e9:.3f} B constrained, "
      f"{c['trainable'] / 1e9:.3f} B with moments",
      f"mesh {mesh} on {report['devices']} devices{acc}; dtypes params {dt['params']}, moments {dt['moments']}, "
      f"bases {dt['bases']}, compute {report.get('compute_dtype', dt['params'])} (bases sized for rank ratio <= "
      f"{report['max_rank_ratio']})",
      f"{'per device':<28}{'GiB':>10}",
  ]
  rows = [("params", f"parameters ({dt['params']})")]
  if per.get("compute_copy"):
    rows.append(("compute_copy", f"{report['compute_dtype']} copy (in step)"))
  rows += [("grads", "gradients (in step)"), ("moments", "Adam moments"), ("bases", "subspace bases"),
           ("total", "total (no activations)"), ("boundary_svd", "task boundary SVD (est.)")]
  for key, label in rows:
    lines.append(f"  {label:<26}{per[key] / GiB:>10.3f}")
  if "hbm_per_device" in report:
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"  {'device memory':<26}{report['hbm_per_device'] / GiB:>10.3f}  -> {verdict} (before activations)")
  if report.get("fallbacks"):
    lines.append(f"replicated dims ({len(report['fallbacks'])}): " + "; ".join(report["fallbacks"][:6]))
  return "\n".join(lines)
