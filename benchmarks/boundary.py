"""What a task boundary costs: the scheduler's boundary against a task's training, LLaMA-2-7B-shaped decompositions.

Three parts (``--part``), each printing JSON lines:

``cpu_small``: the boundary of ``configs/cpu_small.yaml`` (T5 d_model 128, 2 + 1 layers, batch 16 x 512 byte
tokens, activations basis source, energy ranks) against one epoch of its task, on the machine at hand. The boundary
is what the runner does before tasks 2..4: the calibration pass (input covariances of every matrix on
``calibration_batches`` batches), block importance, ranks, the decompositions and accumulation
(``compute_subspaces``, timed through the scheduler's ``compute_fn``) and the records. The first boundary compiles;
the later ones, with the same shapes, reuse the programs. An epoch is ``ceil(max_train / batch_size)`` steps of a
jitted ``constrained(adamw)`` step on batches of the config's shapes (byte-level prompts fill the 512 bucket).

``llama7b``: one matrix of each LLaMA-2-7B shape (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008):
a thin float32 SVD alone, the exact boundary solver (``compute_subspaces``: SVD of the complement part plus an
eigendecomposition of a d x d matrix per side to assemble the stored bases) at the paper's typical first-task rank,
and the randomized solver (``solver="randomized"``) for 1-25% new directions. Single calls (each runs for tens of
seconds to minutes on a CPU) in wall and CPU seconds; a call that compiles includes its compilation (a few CPU
seconds, see the randomized solver's ``_first`` calls), negligible next to the exact decompositions.

``accuracy``: the randomized solver against float64 SVD on matrices with power-law spectra s_i ~ i^-a, a = 0.3
(flat, like MLP weights: the top 10% of directions hold ~40% of the energy) and a = 0.6 (steeper, like attention
projections), and a spectrum with a gap at the cut. Reported per side: the largest principal angle to the exact
top-k subspace (``angle``), the same for float32 exact SVD (``angle_f32_exact``: what float32 can resolve at that
cut), the largest angle of the exact top-k/2 directions to the randomized subspace (``angle_top_half``: are the
important directions in?) and the energy the randomized subspace misses relative to the exact one
(``energy_deficit``).

Extrapolation to the paper's setting (``configs/llama/llama2_7b_order1.yaml``: LLaMA-2-7B, 32 layers x 7 matrices,
importance ranks between 10% and 80% of min(m, n), protection before every task, one epoch per task, batch 64 x
<= 1024 tokens) -- filled in from this script's measurements in the README's Performance section and the issue
note. The arithmetic, with t_sq, t_mlp the per-matrix boundary times of a 4096 x 4096 and an 11008 x 4096 matrix:

    boundary  = 32 x (4 t_sq + 3 t_mlp)                                   (one device; layers split over devices
                                                                           divide it by the device count)
    task      = 6 x 6.7e9 x tokens / (achieved FLOP/s)                    (tokens: 4000-14000 examples x ~256)
    share     = boundary / task

On one CPU both terms are measured on the same hardware (the script measures the achieved float32 GEMM rate), so the
share there is the share on hardware whose decompositions are as efficient relative to its matmuls as a CPU's.
Accelerators run matmuls 10-100x more efficiently relative to SVD / eigh than a CPU does, which multiplies the
exact solver's share by that factor; the randomized solver is matmuls and thin QRs, so its share grows far less.

Usage::

  python benchmarks/boundary.py                      # all parts (the llama7b part takes tens of minutes on 2 cores)
  python benchmarks/boundary.py --part cpu_small     # one part
  python benchmarks/boundary.py --quick              # tiny sizes of every part: a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clsvd_jax as cj
from clsvd_jax._src import randomized

ROOT = Path(__file__).resolve().parents[1]
CPU_SMALL = ROOT / "configs" / "cpu_small.yaml"
QUICK_OVERRIDES = ("model.config.d_model=32", "model.config.d_kv=8", "model.config.d_ff=64",
                   "training.max_length=64", "training.batch_size=4", "training.max_target_length=8",
                   "osft.calibration_batches=2", "tasks.0.max_train=16")
LLAMA7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
PER_LAYER = (4, 2, 1)  # q, k, v, o; gate, up; down: matrices of each shape per layer (32 layers)
COUNTS = (0.01, 0.05, 0.1, 0.25)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
  """``fn(*args, **kwargs)`` and the seconds it took until its results were ready."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - t0


def _emit(row: dict[str, Any]) -> dict[str, Any]:
  print(json.dumps(row), flush=True)
  return row


# ---------------------------------------------------------------------------------------------------------------
# cpu_small: the scheduler's boundary against an epoch
# ---------------------------------------------------------------------------------------------------------------


def _batch(kind: str, vocab: int, b: int, s: int, t: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(3, vocab, (b, n), dtype=np.int32)
  ones = lambda n: np.ones((b, n), np.int32)
  if kind == "encoder_decoder":
    return {"input_ids": ids(s), "attention_mask": ones(s), "decoder_input_ids": ids(t),
            "decoder_attention_mask": ones(t), "labels": ids(t), "loss_mask": ones(t)}
  return {"input_ids": ids(s), "attention_mask": ones(s), "loss_mask": ones(s)}


def cpu_small_part(config: Path, overrides: tuple[str, ...], solver: str, steps: int) -> dict[str, Any]:
  """Boundary phases (cold and warm) against one epoch of the config's first task, see the module docstring."""
  from clsvd_jax.config import load_config
  from clsvd_jax.train import covariance, model_io
  from clsvd_jax.train import scheduler as sched_lib

  cfg = load_config(config, overrides)
  model = model_io.build_model(cfg.model, base_dir=config.parent)
  apply_fn, params = model_io.functional(model)
  kind = model_io.kind_of(model)
  shapes = model_io.constrained_matrices(model)
  vocab = int(model.config.vocab_size)
  tr = cfg.training
  batches = [_batch(kind, vocab, tr.batch_size, tr.max_length, tr.max_target_length, seed) for seed in range(8)]

  def loss_fn(p: Any, batch: dict[str, jax.Array]) -> jax.Array:
    if kind == "encoder_decoder":
      logits = apply_fn(p, batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                        batch["decoder_attention_mask"])
      targets = batch["labels"]
    else:
      logits, targets = apply_fn(p, batch["input_ids"], batch["attention_mask"])[:, :-1], batch["input_ids"][:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()

  mask = cj.map_with_paths(lambda path, _: path in shapes, params)
  tx = cj.constrained(optax.adamw(cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay), mask=mask,
                      sides=cfg.osft.sides, max_rank_ratio=cfg.osft.max_rank_ratio)

  @jax.jit
  def train_step(p, state, batch):
    grads = jax.grad(loss_fn)(p, batch)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  opt_state = tx.init(params)
  decompose: list[float] = []

  def compute_fn(*args: Any, **kwargs: Any) -> Any:
    out, seconds = _timed(cj.compute_subspaces, *args, **kwargs, solver=solver)
    decompose.append(seconds)
    return out

  sched = sched_lib.TaskScheduler(cfg.osft, shapes, len(cfg.tasks), compute_fn=compute_fn)
  cal = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches[:cfg.osft.calibration_batches]]
  boundaries = []
  for task in range(1, len(cfg.tasks)):
    for b in batches[:2]:  # the weights move between boundaries, as in a run
      params, opt_state = train_step(params, opt_state, {k: jnp.asarray(v) for k, v in b.items()})
    model_io.update_model(model, params)
    covs, t_cal = (None, 0.0)
    if cfg.osft.basis_source == "activations":
      covs, t_cal = _timed(covariance.matrix_input_covariances, model, cal)
    inputs = sched_lib.BoundaryInputs(hidden_states=lambda b: model_io.block_hidden_states(model, b),
                                      token_masks=model_io.token_mask_for_stack, importance_batches=cal,
                                      covariances=covs)
    _, t_imp = _timed(sched.measure_importance, inputs)  # also inside before_task: reported apart
    n_before = len(decompose)
    opt_state, t_before = _timed(sched.before_task, task, params, opt_state, inputs)
    t_dec = sum(decompose[n_before:])
    boundaries.append({"task": task + 1, "calibration_s": t_cal, "importance_s": t_imp, "decompose_s": t_dec,
                       "ranks_records_s": max(t_before - t_imp - t_dec, 0.0), "boundary_s": t_cal + t_before})

  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  params, opt_state = train_step(params, opt_state, batch)  # compiled already; one more to settle
  times = []
  for i in range(steps):
    b = {k: jnp.asarray(v) for k, v in batches[i % len(batches)].items()}
    (params, opt_state), seconds = _timed(train_step, params, opt_state, b)
    times.append(seconds)
  steps_per_epoch = math.ceil((cfg.tasks[0].get("max_train") or 1000) / tr.batch_size)
  epoch_s = statistics.median(times) * steps_per_epoch
  warm = [b["boundary_s"] for b in boundaries[1:]] or [boundaries[0]["boundary_s"]]
  return _emit({
      "part": "cpu_small", "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
      "overrides": list(overrides), "solver": solver, "boundaries": boundaries, "step_s": statistics.median(times),
      "steps_per_epoch": steps_per_epoch, "epoch_s": epoch_s, "epochs": tr.epochs,
      "boundary_cold_s": boundaries[0]["boundary_s"], "boundary_warm_s": statistics.median(warm),
      "boundary_cold_over_epoch": boundaries[0]["boundary_s"] / epoch_s,
      "boundary_warm_over_epoch": statistics.median(warm) / epoch_s,
      "boundary_warm_over_task": statistics.median(warm) / (epoch_s * tr.epochs),
      "backend": jax.default_backend()})


# ---------------------------------------------------------------------------------------------------------------
# LLaMA-2-7B shapes
# ---------------------------------------------------------------------------------------------------------------


def _clock(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, float]:
  """Wall seconds and CPU seconds (all threads of this process) of ``fn(*args, **kwargs)`` until its results are
  ready. On a shared machine the CPU seconds are the steadier measure: they do not count waiting for a core."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args, **kwargs))
  return {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def gemm_rate(d: int) -> dict[str, float]:
  """Achieved float32 FLOP per wall second and per CPU second of a d x d x d matmul (best of 3)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (d, d), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  runs = [_clock(f, a) for _ in range(3)]
  return {"s": 2 * d**3 / min(r["s"] for r in runs), "cpu_s": 2 * d**3 / min(r["cpu_s"] for r in runs)}


def llama7b_part(shapes: tuple[tuple[int, int], ...], counts: tuple[float, ...], exact: bool,
                 protected: float) -> list[dict[str, Any]]:
  """Per-matrix boundary times at LLaMA-2-7B shapes (see the module docstring); every figure in wall seconds
  (``<label>_s``) and CPU seconds (``<label>_cpu_s``)."""
  rows = []
  svd = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False))
  for m, n in shapes:
    w = jax.random.normal(jax.random.PRNGKey(m + n), (m, n), jnp.float32) / np.sqrt(n)
    params = {"w": w}
    r = min(m, n)
    runs: list[tuple[str, Callable[[], Any]]] = [("svd", lambda w=w: svd(w))]
    if exact:
      k = int(protected * r)
      runs.append(("exact", lambda k=k, p=params: cj.compute_subspaces(p, {"w": k}, max_rank_ratio=0.8)))
      # The randomized solver at that rank takes its exact fallback (thin SVD) but assembles by QR: no d x d eigh.
      runs.append(("fallback_qr", lambda k=k, p=params: cj.compute_subspaces(p, {"w": k}, max_rank_ratio=0.8,
                                                                            solver="randomized")))
    for frac in counts:
      k = max(1, int(frac * r))
      call = lambda k=k, p=params: cj.compute_subspaces(p, {"w": k}, max_rank_ratio=0.8, solver="randomized")
      runs += [(f"randomized_{frac}_first", call), (f"randomized_{frac}", call)]
    row: dict[str, Any] = {"part": "llama7b", "shape": [m, n], "exact_rank": int(protected * r)}
    for label, call in runs:
      for unit, value in _clock(call).items():
        row[f"{label}_{unit}"] = value
      print(f"[boundary] {m}x{n} {label}: {row[f'{label}_s']:.2f} s", file=sys.stderr, flush=True)
    for frac in counts:
      row[f"randomized_{frac}_exact_fallback"] = randomized.plan_for((m, n), max(1, int(frac * r)), cj.empty_subspace(
          (m, n), max_rank_ratio=0.8)).exact
    rows.append(_emit(row))
  rate = gemm_rate(min(2048, max(s[0] for s in shapes)))
  totals: dict[str, Any] = {"part": "llama7b_total", "gemm_flops_per_s": rate["s"],
                            "gemm_flops_per_cpu_s": rate["cpu_s"], "layers": 32}
  for label in ["svd", "exact", "fallback_qr"] + [f"randomized_{f}" for f in counts]:
    for unit in ("s", "cpu_s"):
      key = f"{label}_{unit}"
      if len(rows) == len(PER_LAYER) and all(key in row for row in rows):
        totals[f"boundary_{key}"] = 32 * sum(c * row[key] for c, row in zip(PER_LAYER, rows))
  # One task of the paper's setting on this hardware: 6 x 6.7e9 FLOPs per token, 4000 (agnews) to 14000
  # (dbpedia) examples of ~256 tokens (the length bucket most batches fill).
  for name, examples in (("agnews", 4000), ("dbpedia", 14000)):
    totals[f"task_s_{name}"] = 6 * 6.7e9 * examples * 256 / rate["s"]
    totals[f"task_cpu_s_{name}"] = 6 * 6.7e9 * examples * 256 / rate["cpu_s"]
  rows.append(_emit(totals))
  return rows


# ---------------------------------------------------------------------------------------------------------------
# Accuracy of the randomized solver
# ---------------------------------------------------------------------------------------------------------------


def spectrum_matrix(dim: int, kind: str, cut: int, seed: int = 0) -> np.ndarray:
  """A dim x dim float32 matrix with random singular vectors and the named spectrum."""
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
  v = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
  i = np.arange(1, dim + 1, dtype=np.float64)
  if kind == "gap":
    s = i**-0.3
    s[cut:] *= 0.3
  else:
    s = i ** -float(kind.split("^")[1])
  return ((u * s) @ v.T).astype(np.float32)


def _energy(left: np.ndarray, w: np.ndarray) -> float:
  """||U^T W||_F^2: the energy of W in the span of the orthonormal columns of ``left``."""
  return float(np.linalg.norm(left.T @ w) ** 2)


def _sin_largest(a: np.ndarray, b: np.ndarray) -> float:
  """sin of the largest principal angle of span(b) to span(a) (a, b orthonormal columns, b's span <= a's dim)."""
  return float(np.linalg.norm(b - a @ (a.T @ b), 2))


def accuracy_part(dim: int, spectra: tuple[str, ...], counts: tuple[float, ...],
                  power_iters: tuple[int, ...]) -> list[dict[str, Any]]:
  rows = []
  basis = jax.jit(cj.protected_basis, static_argnums=1)
  for kind in spectra:
    for frac in counts:
      k = max(2, int(frac * dim))
      w = spectrum_matrix(dim, kind, k)
      u64, s64, vt64 = np.linalg.svd(w.astype(np.float64))
      ref = {"left": u64[:, :k], "right": vt64[:k].T}
      half = {"left": u64[:, :k // 2], "right": vt64[:k // 2].T}
      exact = cj.compute_subspaces({"w": w}, {"w": k})["w"]
      row: dict[str, Any] = {"part": "accuracy", "dim": dim, "spectrum": kind, "k": k,
                             "gap_at_cut": float(s64[k - 1] / s64[k] - 1)}
      row["angle_f32_exact"] = max(_sin_largest(np.asarray(basis(exact, s))[:, :k], ref[s]) for s in ref)
      for q in power_iters:
        sub = randomized.accumulate(w, k, cj.empty_subspace(w.shape), power_iters=q)[0]
        got = {s: np.asarray(basis(sub, s), np.float64)[:, :k] for s in ref}
        row[f"q{q}"] = {
            "angle": max(_sin_largest(got[s], ref[s]) for s in ref),
            "angle_top_half": max(_sin_largest(got[s], half[s]) for s in ref),
            "energy_deficit": 1 - _energy(got["left"], w) / _energy(ref["left"], w),
            "exact_fallback": randomized.plan_for(w.shape, k, cj.empty_subspace(w.shape)).exact}
      rows.append(_emit(row))
  return rows


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--part", nargs="+", choices=("cpu_small", "llama7b", "accuracy"),
                  default=["cpu_small", "llama7b", "accuracy"])
  ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke test)")
  ap.add_argument("--config", type=Path, default=CPU_SMALL)
  ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
  ap.add_argument("--solver", choices=("exact", "randomized"), default="exact", help="cpu_small part's solver")
  ap.add_argument("--steps", type=int, default=5, help="timed train steps of the cpu_small epoch estimate")
  ap.add_argument("--no-exact", action="store_true", help="llama7b: skip the exact solver (minutes per matrix)")
  ap.add_argument("--protected", type=float, default=0.45, help="llama7b: rank of the exact solver (fraction)")
  ap.add_argument("--dim", type=int, default=2048, help="accuracy: matrix size")
  args = ap.parse_args(argv)

  rows = []
  if "cpu_small" in args.part:
    overrides = tuple(args.overrides) + (QUICK_OVERRIDES if args.quick else ())
    rows.append(cpu_small_part(args.config, overrides, args.solver, 2 if args.quick else args.steps))
  if "llama7b" in args.part:
    shapes = ((64, 64), (172, 64), (64, 172)) if args.quick else LLAMA7B_SHAPES
    rows += llama7b_part(shapes, COUNTS, not args.no_exact, args.protected)
  if "accuracy" in args.part:
    dim = 96 if args.quick else args.dim
    rows += accuracy_part(dim, ("power^0.3", "power^0.6", "gap"), (0.05,) if args.quick else (0.01, 0.05, 0.1),
                          (4,) if args.quick else (4, 8))
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
