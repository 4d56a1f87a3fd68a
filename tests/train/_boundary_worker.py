"""Three protected task boundaries of the scheduler at ``configs/cpu_small.yaml``'s matrix sizes, in one process.

Activations basis, energy ranks, the matrices of a T5 with d_model 128, d_ff 256, 2 encoder and 1 decoder layers;
between boundaries a few constrained AdamW steps run asynchronously and the input covariances come from a jitted
program still in flight, as in the runner. Pinned to two CPUs (XLA's CPU pool then has two threads, as on the
machines where the boundary wedged). Prints ``ok SECONDS``.
"""

import os
import sys
import time

if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import clsvd_jax as cj  # noqa: E402
from clsvd_jax.config import OsftConfig, RankPolicyConfig  # noqa: E402
from clsvd_jax.train import scheduler as sched_lib  # noqa: E402

D_MODEL, D_FF = 128, 256


def shapes() -> dict[str, tuple[int, ...]]:
  out = {}
  for stack, layers in (("encoder/layers", 2), ("decoder/layers", 1)):
    attn = ("self_attn",) if stack.startswith("encoder") else ("self_attn", "cross_attn")
    for a in attn:
      for m in ("q", "k", "v", "o"):
        out[f"{stack}/{a}/{m}/weight"] = (layers, D_MODEL, D_MODEL)
    out[f"{stack}/mlp/wi/weight"] = (layers, D_FF, D_MODEL)
    out[f"{stack}/mlp/wo/weight"] = (layers, D_MODEL, D_FF)
  return out


def nest(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    *head, last = path.split("/")
    node = out
    for h in head:
      node = node.setdefault(h, {})
    node[last] = v
  return out


def main(tasks: int = 4) -> None:
  shp = shapes()
  key = jax.random.key(0)
  params = nest({p: 0.05 * jax.random.normal(jax.random.fold_in(key, i), s) for i, (p, s) in enumerate(shp.items())})
  tx = cj.constrained(optax.adamw(1e-3))
  opt_state = tx.init(params)
  cfg = OsftConfig(basis_source="activations", start_protecting_from=2,
                   rank_policy=RankPolicyConfig(name="energy", eps=0.9))
  scheduler = sched_lib.TaskScheduler(cfg, shp, tasks)

  @jax.jit
  def covariances(params, x):
    return {p: jnp.broadcast_to(jnp.einsum("btn,btm->nm", jnp.tanh(x[..., :s[-1]]), jnp.tanh(x[..., :s[-1]])),
                                s[:-2] + (s[-1], s[-1])) for p, s in shp.items()}

  @jax.jit
  def step(params, opt_state, x):
    grads = jax.tree.map(lambda w: jnp.tanh(w * x.mean()), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  t0 = time.time()
  for task in range(tasks):
    x = jax.random.normal(jax.random.fold_in(key, 100 + task), (16, 64, D_FF))
    inputs = sched_lib.BoundaryInputs(covariances=covariances(params, x) if task else None)
    opt_state = scheduler.before_task(task, params, opt_state, inputs)
    for _ in range(3):
      params, opt_state = step(params, opt_state, x)
  protected = sum(r["protected"] for r in scheduler.records)
  assert protected == tasks - 1, scheduler.records
  print(f"ok {time.time() - t0:.1f}", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
