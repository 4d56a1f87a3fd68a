"""Step-time and memory overhead of ``constrained(adamw)`` over plain ``adamw`` on a LLaMA-shaped stack.

Model: ``layers`` pre-norm transformer-like blocks of width ``d`` (q, k, v, o: d x d; gate, up: f x d; down: d x f
with f = 2.6875 d as in LLaMA), the attention softmax replaced by an element-wise gate; ``tokens`` tokens per optimizer
step (d / tokens = 1/16 as for a 7B model trained on 64 x 1024-token batches).

Expected overhead. One projection of an m x n update with c_l, c_r stored columns costs 4 m n (c_l + c_r) flops
(two thin matmuls per side); ``constrained`` projects twice per step (gradient and final update), so

    extra flops / step  = sum over matrices of 8 m n (c_l + c_r)
    fwd+bwd flops / step = sum over matrices of 6 m n T
    step_ratio - 1      ~= 8 (c_l + c_r) / (6 T) per matrix,

with c <= d / 2 per side: at most 8 d / (6 T) = 8.3% for d / T = 1/16 (and half that with
``project_gradients=False``). Adam's element-wise work is the same in both runs.

Memory: Adam keeps 2 moments (2x params); the bases of an m x n matrix cost m c_l + n c_r floats with
c = min(dim // 2, ceil(rho min(m, n))) for a rank cap rho (``max_rank_ratio``), i.e. <= 1x params for square
matrices and rho <= 0.8 on LLaMA's MLP shapes, so state_ratio = 2 + bases / params <= 3.0 there.

Prints one JSON line per protected fraction with keys ``protected``, ``step_ratio`` (median of interleaved
constrained/plain step-time ratios), ``state_ratio`` and the raw medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clsvd_jax as cj


def make_params(d: int, layers: int, key: jax.Array) -> dict:
  f = int(round(2.6875 * d))
  shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}
  keys = jax.random.split(key, len(shapes))
  return {name: jax.random.normal(k, (layers,) + s, jnp.float32) / np.sqrt(s[1]) for (name, s), k in
          zip(shapes.items(), keys)}


def rms_norm(h: jax.Array) -> jax.Array:
  return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def loss_fn(params: dict, x: jax.Array) -> jax.Array:
  # Pre-norm blocks as in LLaMA: without the norms the residual stream overflows float32 past a few layers.
  def block(h, w):
    a = rms_norm(h)
    q, k, v = a @ w["q"].T, a @ w["k"].T, a @ w["v"].T
    h = h + (q * jax.nn.sigmoid(k) * v) @ w["o"].T
    a = rms_norm(h)
    return h + (jax.nn.silu(a @ w["gate"].T) * (a @ w["up"].T)) @ w["down"].T, None

  h, _ = jax.lax.scan(block, x, params)
  return jnp.mean(h**2)


def make_step(tx: optax.GradientTransformation):
  def step(params, state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_once(step, params, state, x):
  t0 = time.perf_counter()
  params, state = step(params, state, x)
  jax.block_until_ready((params, state))
  return time.perf_counter() - t0, params, state


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d", type=int, default=256)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--protected", type=float, nargs="+", default=[0.1, 0.5, 0.9])
  ap.add_argument("--max-rank-ratio", type=float, default=None,
                  help="rank cap the bases are sized for (default: each setting's protected fraction, the smallest "
                       "capacity that holds it; a run sizes them once for its last task)")
  args = ap.parse_args(argv)

  key = jax.random.PRNGKey(0)
  params0 = make_params(args.d, args.layers, key)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.tokens, args.d), jnp.float32)
  adamw = optax.adamw(1e-4, weight_decay=0.01)
  plain = make_step(adamw)

  runs = {}
  for frac in args.protected:
    cap = args.max_rank_ratio or frac
    tx = cj.constrained(adamw, max_rank_ratio=cap)
    ranks = {name: np.full((args.layers,), int(frac * min(w.shape[-2:])), np.int32) for name, w in params0.items()}
    subs = cj.compute_subspaces(params0, ranks, max_rank_ratio=cap)
    state = cj.set_subspaces(tx.init(params0), subs)
    runs[frac] = {"params": jax.tree.map(jnp.copy, params0), "state": state, "times": [], "step": make_step(tx),
                  "cap": cap, "state_ratio": tree_bytes(state) / tree_bytes(params0)}
  plain_run = {"params": jax.tree.map(jnp.copy, params0), "state": adamw.init(params0), "times": []}

  # Warm-up (compile) both steps, then interleave so machine noise hits both alike.
  for run, step in [(plain_run, plain)] + [(r, r["step"]) for r in runs.values()]:
    _, run["params"], run["state"] = time_once(step, run["params"], run["state"], x)
  ratios = {frac: [] for frac in runs}
  for _ in range(args.repeats):
    for frac, run in runs.items():
      t_plain, plain_run["params"], plain_run["state"] = time_once(plain, plain_run["params"], plain_run["state"], x)
      t_con, run["params"], run["state"] = time_once(run["step"], run["params"], run["state"], x)
      plain_run["times"].append(t_plain)
      run["times"].append(t_con)
      ratios[frac].append(t_con / t_plain)

  results = []
  for frac, run in runs.items():
    row = {
        "protected": frac,
        "step_ratio": round(statistics.median(ratios[frac]), 4),
        # The spread of the paired ratios: CPU timings are noisy, a ratio means little without it.
        "step_ratio_q1_q3": [round(q, 4) for q in np.percentile(ratios[frac], [25, 75])],
        "state_ratio": round(run["state_ratio"], 4),
        "median_step_s_constrained": round(statistics.median(run["times"]), 5),
        "median_step_s_plain": round(statistics.median(plain_run["times"]), 5),
        "d": args.d, "layers": args.layers, "tokens": args.tokens, "max_rank_ratio": run["cap"],
        "backend": jax.default_backend(),
    }
    print(json.dumps(row), flush=True)
    results.append(row)
  return results


if __name__ == "__main__":
  main()
