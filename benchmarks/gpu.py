"""The accelerator check: throughput, MFU and memory of constrained AdamW on a ~1B LLaMA, boundary cost at 7B shapes.

One prepared script for a lent GPU (or TPU) machine, under 8 minutes (``--budget-s`` stops starting new parts once
it is spent and prints what it has). It prints ONE JSON object on stdout (progress on stderr):

* ``throughput``: a ~0.94B-parameter LLaMA (hidden 2048, MLP 5504, 16 layers, 16 heads of 128, vocabulary 32000,
  random weights), float32 master weights, parameters, gradients and Adam moments; forward and backward in
  bfloat16; batch 8 x 1024 tokens. Plain ``optax.adamw`` against ``constrained(adamw)`` (attention and MLP matrices)
  at 10/50/90% protected, bases sized for the fraction (``max_rank_ratio``). Per setting: median step time over
  ``--steps`` steps after compilation, tokens/s, model FLOPs utilisation (6 N + 12 L H Q T FLOPs per token, PaLM's
  count, over the device's dense bf16 peak when the device kind is known), the step program's memory
  (``memory_analysis``) and the step's held state bytes. The bases hold random orthonormal directions in the stored
  form: a step's cost depends on their shapes and flags, not on which directions they are.
* ``precision``: the projected AdamW update of a LLaMA-shaped stack at each matmul precision the device offers
  (``Precision.DEFAULT/HIGH/HIGHEST`` and the ``DotAlgorithmPreset`` algorithms that matter: 3-pass TF32, 3- and
  6-pass bf16), with its time and the one-projection leak ``||U^T P(G)|| / ||P(G)||`` (``benchmarks/precision.py``).
* ``boundary``: one matrix of each LLaMA-2-7B shape (4096 x 4096, 11008 x 4096, 4096 x 11008): the exact solver at
  45% protected and the randomized solver at 1/10/25% new directions, plus the exact-fallback QR assembly at 45%,
  first call (with compilation) and second call; the 32-layer totals as ``boundary.py`` computes them.
* ``device``: kind, count, peak bytes in use over the whole run (``memory_stats``).

``--tiny`` runs every part at toy sizes on whatever backend is present (CPU: seconds); ``tests/test_benchmarks.py``
runs it. Figures from a device go in the issue note, never in a test.

Usage::

  python benchmarks/gpu.py                  # on the device machine
  python benchmarks/gpu.py --tiny           # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import precision as precision_bench  # noqa: E402

import clsvd_jax as cj  # noqa: E402
from clsvd_jax import models  # noqa: E402
from clsvd_jax._src import randomized  # noqa: E402

# Dense bf16 peak FLOP/s per device by device_kind prefix (vendor data sheets; no sparsity).
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
             "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
  hidden: int
  intermediate: int
  layers: int
  heads: int
  vocab: int
  batch: int
  length: int
  shapes_7b: tuple[tuple[int, int], ...]
  precision_d: int
  fractions: tuple[float, ...] = (0.1, 0.5, 0.9)
  precisions: tuple[str, ...] = ("DEFAULT", "HIGH", "HIGHEST", "TF32_TF32_F32_X3", "BF16_BF16_F32_X3",
                                 "BF16_BF16_F32_X6", "F32_F32_F32")
  boundary_fractions: tuple[float, ...] = (0.01, 0.1, 0.25)

  def hf_config(self) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
            "max_position_embeddings": self.length, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


FULL = Sizes(2048, 5504, 16, 16, 32000, 8, 1024, ((4096, 4096), (11008, 4096), (4096, 11008)), 1024)
# Toy sizes that still take every code path (one matrix shape; a CPU refuses TF32_TF32_F32_X3: the error path).
TINY = Sizes(64, 172, 2, 4, 128, 2, 32, ((172, 64),), 32, fractions=(0.5,),
             precisions=("HIGHEST", "TF32_TF32_F32_X3"), boundary_fractions=(0.1,))


def log(msg: str) -> None:
  print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def random_subspace(shape: tuple[int, ...], rank: int, max_rank_ratio: float, key: jax.Array) -> cj.Subspace:
  """A valid subspace of ``rank`` random orthonormal directions per side, in the stored form the library uses (the
  protected columns, or the allowed complement when that is smaller)."""
  empty = cj.empty_subspace(shape, max_rank_ratio=max_rank_ratio)
  *batch, m, n = shape
  sides = []
  for dim, basis, k in ((m, empty.left, jax.random.fold_in(key, 0)), (n, empty.right, jax.random.fold_in(key, 1))):
    c = basis.shape[-1]
    allow = rank > c
    used = dim - rank if allow else rank
    q = jnp.linalg.qr(jax.random.normal(k, tuple(batch) + (dim, c), jnp.float32))[0]
    sides.append((q * (jnp.arange(c) < used), jnp.full(tuple(batch), allow)))
  (left, left_allow), (right, right_allow) = sides
  return cj.Subspace(left, right, left_allow, right_allow, jnp.full(tuple(batch), rank, jnp.int32))


def throughput(sizes: Sizes, steps: int) -> dict[str, Any]:
  model = models.init_from_config(sizes.hf_config(), seed=0)
  apply_fn, params = models.functional(model)
  targets = models.constrained_matrices(model)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_matmul = n_params - sizes.vocab * sizes.hidden  # the embedding lookup is not a matmul; the head is
  tokens = sizes.batch * sizes.length
  flops = 6 * n_matmul * tokens + 12 * sizes.layers * sizes.hidden * sizes.length * tokens
  ids = jax.random.randint(jax.random.PRNGKey(1), (sizes.batch, sizes.length), 0, sizes.vocab)
  adamw = optax.adamw(1e-5, weight_decay=0.01)
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)

  def loss_fn(p: Any, x: jax.Array) -> jax.Array:
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)  # bf16 compute, float32 master weights
    logits = apply_fn(p16, x)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

  def make_step(tx: optax.GradientTransformation):
    def step(p, state, x):
      loss, grads = jax.value_and_grad(loss_fn)(p, x)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))

  settings: dict[str, tuple[optax.GradientTransformation, Any]] = {"plain": (adamw, None)}
  mask = cj.map_with_paths(lambda path, _: path in targets, params)
  for f in sizes.fractions:
    settings[f"constrained_{f}"] = (cj.constrained(adamw, mask=mask, max_rank_ratio=f), f)
  out: dict[str, Any] = {"params": n_params, "tokens_per_step": tokens, "model_flops_per_step": flops,
                         "device_kind": kind, "peak_flops": peak}
  for name, (tx, frac) in settings.items():
    p = jax.tree.map(jnp.copy, params)
    state = tx.init(p)
    if frac is not None:
      subs = {path: random_subspace(shape, int(frac * min(shape[-2:])), frac, jax.random.PRNGKey(i))
              for i, (path, shape) in enumerate(targets.items())}
      state = cj.set_subspaces(state, cj.map_with_paths(lambda path, _, subs=subs: subs.get(path), params))
    step = make_step(tx)
    t0 = time.perf_counter()
    compiled = step.lower(p, state, ids).compile()
    compile_s = time.perf_counter() - t0
    mem = None
    try:
      ma = compiled.memory_analysis()
      mem = {k: int(getattr(ma, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")}
    except (AttributeError, NotImplementedError, RuntimeError):
      pass
    held = tree_bytes(p) + tree_bytes(state)
    p, state, loss = compiled(p, state, ids)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      p, state, loss = compiled(p, state, ids)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    out[name] = {"step_s": t, "step_s_q1_q3": [float(q) for q in np.percentile(times, [25, 75])],
                 "tokens_per_s": tokens / t, "mfu": flops / t / peak if peak else None, "compile_s": compile_s,
                 "held_state_bytes": held, "step_program_bytes": mem, "final_loss": float(loss)}
    log(f"{name}: {t:.4f} s/step, {tokens / t:.0f} tokens/s")
    del p, state, compiled
  for name in settings:
    if name != "plain":
      out[name]["step_ratio"] = out[name]["step_s"] / out["plain"]["step_s"]
  return out


def precision_part(sizes: Sizes, repeats: int) -> list[dict[str, Any]]:
  """Time and one-projection leak of the projected update at every precision the device accepts."""
  d = sizes.precision_d
  params = precision_bench.overhead.make_params(d, 4, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (16 * d, d), jnp.float32)
  ranks = {k: np.full((4,), int(0.5 * min(w.shape[-2:])), np.int32) for k, w in params.items()}
  subs = {k: random_subspace(w.shape, int(r[0]), 0.5, jax.random.PRNGKey(i))
          for i, ((k, w), r) in enumerate(zip(params.items(), ranks.values()))}
  tx = optax.adamw(1e-3, weight_decay=0.01)
  presets = jax.lax.DotAlgorithmPreset
  choices = {name: getattr(jax.lax.Precision, name, None) or getattr(presets, name, None) for name in sizes.precisions}
  rows = []
  state = tx.init(params)
  for name, prec in choices.items():
    if prec is None:
      rows.append({"precision": name, "error": "not in this jax version"})
      continue
    mm = precision_bench.precision_matmul(prec)
    try:
      update = precision_bench.make_update(tx, mm)
      jax.block_until_ready(update(params, state, subs, x))
    except Exception as e:  # noqa: BLE001  (a backend that lacks an algorithm says so; the others still run)
      rows.append({"precision": name, "error": str(e).splitlines()[0][:200]})
      continue
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(update(params, state, subs, x))
      times.append(time.perf_counter() - t0)
    rows.append({"precision": name, "update_s": statistics.median(times),
                 "single_leak": precision_bench.single_leak(params, subs, x, mm)})
    log(f"precision {name}: {rows[-1]['update_s']:.4f} s, leak {rows[-1]['single_leak']:.1e}")
  return rows


def boundary_part(sizes: Sizes) -> dict[str, Any]:
  rows = []
  for m, n in sizes.shapes_7b:
    w = jax.random.normal(jax.random.PRNGKey(m + n), (m, n), jnp.float32) / np.sqrt(n)
    r = min(m, n)
    row: dict[str, Any] = {"shape": [m, n]}
    runs = [("exact", int(0.45 * r), "exact"), ("fallback_qr", int(0.45 * r), "randomized")]
    runs += [(f"randomized_{f}", max(1, int(f * r)), "randomized") for f in sizes.boundary_fractions]
    for label, k, solver in runs:
      for call in ("first", "second"):
        t0 = time.perf_counter()
        jax.block_until_ready(cj.compute_subspaces({"w": w}, {"w": k}, max_rank_ratio=0.8, solver=solver))
        row[f"{label}_{call}_s"] = time.perf_counter() - t0
      if solver == "randomized":
        row[f"{label}_exact_fallback"] = randomized.plan_for((m, n), k, cj.empty_subspace(
            (m, n), max_rank_ratio=0.8)).exact
      log(f"boundary {m}x{n} {label}: {row[f'{label}_second_s']:.3f} s")
    rows.append(row)
  per_layer = (4, 2, 1)  # 4096 x 4096, 11008 x 4096, 4096 x 11008 matrices per LLaMA-2-7B layer
  labels = ["exact", "fallback_qr"] + [f"randomized_{f}" for f in sizes.boundary_fractions]
  totals = {f"boundary_32_layers_{label}_s": 32 * sum(c * row[f"{label}_second_s"] for c, row in zip(per_layer, rows))
            for label in labels} if len(rows) == len(per_layer) else {}
  return {"matrices": rows, **totals}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="toy sizes on any backend (a smoke test)")
  ap.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 10, 2 with --tiny)")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="start no new part after this many seconds (default 420; none with --tiny)")
  ap.add_argument("--parts", nargs="+", choices=("throughput", "precision", "boundary"),
                  default=["throughput", "precision", "boundary"])
  args = ap.parse_args(argv)
  sizes = TINY if args.tiny else FULL
  steps = args.steps or (2 if args.tiny else 10)
  budget = args.budget_s if args.budget_s is not None else (float("inf") if args.tiny else 420.0)
  start = time.perf_counter()
  dev = jax.devices()[0]
  result: dict[str, Any] = {"backend": jax.default_backend(), "device": {"kind": dev.device_kind,
                                                                         "count": jax.device_count()},
                            "tiny": args.tiny, "skipped": []}
  parts = {"throughput": lambda: throughput(sizes, steps), "precision": lambda: precision_part(sizes, steps),
           "boundary": lambda: boundary_part(sizes)}
  for name in args.parts:
    if time.perf_counter() - start > budget:
      result["skipped"].append(name)
      log(f"budget spent: {name} skipped")
      continue
    log(f"{name} ...")
    t0 = time.perf_counter()
    result[name] = parts[name]()
    result[f"{name}_wall_s"] = time.perf_counter() - t0
  stats = getattr(dev, "memory_stats", lambda: None)()
  result["device"]["peak_bytes_in_use"] = (stats or {}).get("peak_bytes_in_use")
  result["wall_s"] = time.perf_counter() - start
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
