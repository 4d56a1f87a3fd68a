"""Leak and time of the projection's matmuls at each matmul precision, float32 master weights.

The projection ``P(G) = (I - U U^T) G (I - V V^T)`` runs as thin matmuls (``B^T G``, then ``B (B^T G)``, each side),
accumulating in float32. Whatever error the matmuls make in ``U^T G`` stays in the update as a component along the
protected directions: a matmul with relative error e leaks ``||U^T P(G)|| ~ e ||U U^T G||``. The library's default
per backend (``clsvd_jax.default_precision``, chosen from this script's figures; ``LIBRARY_DEFAULT`` below names the
row that stands for it): HIGHEST on CPU, TF32 x3 on Ampere+ GPUs, HIGH (bf16 x3) on TPU. What the precisions mean
per backend (float32 operands, float32 accumulation):

=========  ===========================  ============================  ==========================================
backend    DEFAULT                      HIGH                          HIGHEST
=========  ===========================  ============================  ==========================================
CPU        float32                      float32                       float32 (all three identical)
GPU        TF32 on Ampere+ (10-bit      TF32                          float32 on CUDA cores (~1/15 of the bf16
           mantissa, e ~ 5e-4)                                        tensor-core rate on an H100)
TPU        1 bf16 pass (e ~ 4e-3)       3 bf16 passes (bf16_3x)       6 bf16 passes (bf16_6x, ~float32)
=========  ===========================  ============================  ==========================================

A CPU computes every one of them in float32, so this script measures the real precisions' time and leak on the
backend it runs on AND emulates the accelerators' schemes exactly on any backend: operands split into bf16 / TF32
pieces (round to nearest even), the pairwise products (exact in float32) accumulated in float32, as XLA does on TPU
(bf16 x1 / x3 / x6) and cuBLAS does on GPU (TF32 x1, and the 3-pass TF32 algorithm
``jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3``).

Measured per scheme and protected fraction, on a LLaMA-shaped stack (``overhead.py``'s model: d = 256, MLP 688,
4 layers, 4096 tokens):

* ``single``: ``max ||U^T P(G)|| / ||P(G)||`` (and the right side) over the stacked matrices for one gradient;
* ``leak``: the runner's ``invariant_max`` (``clsvd_jax.train.metrics.invariant_ratios``: left and right ratios of
  ``dW`` over moved layers) after ``--steps`` steps of ``constrained(adamw)`` (lr 1e-3, both projections at the
  scheme), and ``floor``: what float32 rounding of the weights alone leaves (``sqrt(steps) 2^-24 ||W|| / ||dW||``);
* ``step_s``: median time of the projected optimizer update (two projections + AdamW) at the real precisions.

``--json`` prints JSON lines; default a markdown table and the recommendation the numbers support.
"""

from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the benchmark's LLaMA-shaped stack)

import clsvd_jax as cj  # noqa: E402
from clsvd_jax.train import metrics  # noqa: E402

Matmul = Callable[[jax.Array, jax.Array], jax.Array]
_P = jax.lax.Precision


def round_bf16(x: jax.Array) -> jax.Array:
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def round_tf32(x: jax.Array) -> jax.Array:
  """Float32 rounded to TF32 (10 explicit mantissa bits), round to nearest even."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


# (rounding, number of pieces, pairs of pieces multiplied): the pass structure of each scheme.
_BF16_6 = ((0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (1, 1))
EMULATED = {
    "TPU DEFAULT (bf16 x1)": (round_bf16, 1, _BF16_6[:1]),
    "TPU HIGH (bf16 x3)": (round_bf16, 2, _BF16_6[:3]),
    "TPU HIGHEST (bf16 x6)": (round_bf16, 3, _BF16_6),
    "GPU DEFAULT/HIGH (tf32 x1)": (round_tf32, 1, _BF16_6[:1]),
    "GPU TF32_TF32_F32_X3 (tf32 x3)": (round_tf32, 2, _BF16_6[:3]),
}
# The row that stands for ``clsvd_jax.default_precision(platform)`` on each platform.
LIBRARY_DEFAULT = {"cpu": "cpu HIGHEST", "tpu": "emulated TPU HIGH (bf16 x3)",
                   "cuda": "emulated GPU TF32_TF32_F32_X3 (tf32 x3)"}


def emulated_matmul(rounding: Callable[[jax.Array], jax.Array], pieces: int,
                    pairs: tuple[tuple[int, int], ...]) -> Matmul:
  """A float32 matmul computed as an accelerator computes it: operands split into ``pieces`` rounded pieces, the
  listed piece products (exact in float32) summed in float32, smallest first."""

  def split(x: jax.Array) -> list[jax.Array]:
    out = []
    for _ in range(pieces):
      hi = rounding(x)
      out.append(hi)
      x = x - hi
    return out

  def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    pa, pb = split(a), split(b)
    terms = [jnp.matmul(pa[i], pb[j], precision=_P.HIGHEST) for i, j in reversed(pairs)]
    return sum(terms[1:], terms[0])

  return mm


def precision_matmul(precision: Any) -> Matmul:
  return lambda a, b: jnp.matmul(a, b, precision=precision)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def project(g: jax.Array, s: cj.Subspace, mm: Matmul) -> jax.Array:
  """``clsvd_jax.project(g, s, "both")`` with its matmuls done by ``mm`` (the library's algebra, line for line)."""
  left = mm(s.left, mm(_t(s.left), g))
  g = jnp.where(s.left_allow[..., None, None], left, g - left)
  right = mm(mm(g, s.right), _t(s.right))
  return jnp.where(s.right_allow[..., None, None], right, g - right)


def make_update(tx: optax.GradientTransformation, mm: Matmul):
  """``constrained(tx)``'s update (project the gradient, inner step, project the final update) at ``mm``."""

  def update(params: dict, state: Any, subs: dict, x: jax.Array):
    grads = jax.grad(overhead.loss_fn)(params, x)
    grads = {k: project(g, subs[k], mm) for k, g in grads.items()}
    updates, state = tx.update(grads, state, params)
    updates = {k: project(u, subs[k], mm) for k, u in updates.items()}
    return optax.apply_updates(params, updates), state

  return jax.jit(update)


_protected_basis = jax.jit(cj.protected_basis, static_argnums=1)


def single_leak(params: dict, subs: dict, x: jax.Array, mm: Matmul) -> float:
  """``max ||U^T P(G)|| / ||P(G)||`` (and ``||P(G) V|| / ||P(G)||``) over matrices, P at ``mm``, in float64."""
  grads = jax.grad(overhead.loss_fn)(params, x)
  worst = 0.0
  for k, g in grads.items():
    pg = np.asarray(project(g, subs[k], mm), np.float64)
    for side in ("left", "right"):
      b = np.asarray(_protected_basis(subs[k], side), np.float64)
      rank = int(np.asarray(subs[k].rank).reshape(-1)[0])
      b = b[..., :rank]
      inside = np.einsum("lmk,lmn->lkn", b, pg) if side == "left" else np.einsum("lmn,lnk->lmk", pg, b)
      ratio = np.linalg.norm(inside, axis=(-2, -1)) / np.linalg.norm(pg, axis=(-2, -1))
      if not np.all(np.isfinite(ratio)):
        raise FloatingPointError(f"non-finite projected gradient of {k!r}: the benchmark's model diverged")
      worst = max(worst, float(ratio.max()))
  return worst


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=10, help="timed updates per real precision")
  ap.add_argument("--protected", type=float, nargs="+", default=[0.1, 0.5, 0.9])
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--schemes", nargs="+", default=None, metavar="NAME",
                  help="only the schemes whose name contains one of these (default all)")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  params0 = overhead.make_params(args.d, args.layers, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (args.tokens, args.d), jnp.float32)
  tx = optax.adamw(args.lr, weight_decay=0.01)
  schemes: dict[str, Matmul] = {f"{jax.default_backend()} {p.name}": precision_matmul(p)
                                for p in (_P.HIGHEST, _P.HIGH, _P.DEFAULT)}
  schemes |= {f"emulated {name}": emulated_matmul(*spec) for name, spec in EMULATED.items()}
  if args.schemes:
    schemes = {name: mm for name, mm in schemes.items() if any(part in name for part in args.schemes)}
  rows = []
  for frac in args.protected:
    ranks = {k: np.full((args.layers,), int(frac * min(w.shape[-2:])), np.int32) for k, w in params0.items()}
    subs = cj.compute_subspaces(params0, ranks, max_rank_ratio=max(frac, 0.5))
    lib = {k: cj.project(g, subs[k]) for k, g in jax.grad(overhead.loss_fn)(params0, x).items()}
    ours = {k: project(g, subs[k], precision_matmul(_P.HIGHEST))
            for k, g in jax.grad(overhead.loss_fn)(params0, x).items()}
    # The emulation's algebra is the library's: identical at HIGHEST up to rounding.
    same = max(float(jnp.max(jnp.abs(lib[k] - ours[k]))) / float(jnp.max(jnp.abs(lib[k]))) for k in lib)
    updates = {name: make_update(tx, mm) for name, mm in schemes.items()}
    times: dict[str, list[float]] = {name: [] for name in schemes}
    for name in schemes:  # compile
      jax.block_until_ready(updates[name](params0, tx.init(params0), subs, x))
    real = [n for n in schemes if not n.startswith("emulated")]
    for _ in range(args.repeats):  # interleaved, so machine noise hits every precision alike
      for name in real:
        t0 = time.perf_counter()
        jax.block_until_ready(updates[name](params0, tx.init(params0), subs, x))
        times[name].append(time.perf_counter() - t0)
    for name, mm in schemes.items():
      params, state = params0, tx.init(params0)
      for _ in range(args.steps):
        params, state = updates[name](params, state, subs, x)
      inv = metrics.invariant_ratios(params0, params, subs, steps=args.steps)
      row = {"scheme": name, "protected": frac, "single": single_leak(params0, subs, x, mm),
             "leak": max(max(r["left"], r["right"]) for r in inv.values()),
             "floor": max(r["floor"] for r in inv.values()), "library_vs_emulation_at_highest": same,
             "step_s": statistics.median(times[name]) if times[name] else None, "steps": args.steps,
             "backend": jax.default_backend()}
      rows.append(row)
      if args.json:
        print(json.dumps(row), flush=True)
  if not args.json:
    print(markdown(rows))
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  lines = ["| scheme | protected | one projection | after steps | float32 floor | update s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    step = f"{r['step_s']:.4f}" if r["step_s"] is not None else "-"
    lines.append(f"| {r['scheme']} | {r['protected']:.0%} | {r['single']:.1e} | {r['leak']:.1e} | {r['floor']:.1e} "
                 f"| {step} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
