"""The task-boundary wedge in plain JAX: batched eigh kernels nested in XLA's CPU thread pool.

  python tests/core/_eigh_wedge.py vmap      # jax.vmap around the decompositions: stops at 0% CPU on 2 threads
  python tests/core/_eigh_wedge.py map       # jax.lax.map (one matrix per kernel call): finishes
  python tests/core/_eigh_wedge.py library   # clsvd_jax._src.linalg.map_matrices (what the library uses)
  python tests/core/_eigh_wedge.py MODE 2     # two rounds instead of six (the test)

The program has the shape of one boundary of ``configs/cpu_small.yaml`` (activations basis): per constrained matrix
of a 2 + 1 layer T5 with d_model 128 and d_ff 256, the top eigenvectors of two projected covariances and two
re-orthogonalisations, four eigh calls per matrix, on covariances that an asynchronous program is still producing.
With ``vmap`` each eigh is one batched kernel that splits its batch over the intra-op pool and blocks a pool thread
until the pieces return (``jax::ParallelBatchMap``); the thunk executor runs two of them at once, both pool threads
wait, nothing is left to run the pieces. The process is pinned to two CPUs (as on the 2-core machines where it was
seen), so the pool has two threads here too. Prints ``ok SECONDS`` when it finishes.
"""

import os
import sys
import time

if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

SHAPES = [(2, 128, 128)] * 4 + [(2, 256, 128), (2, 128, 256)] + [(1, 128, 128)] * 8 + [(1, 256, 128), (1, 128, 256)]


def _top(gram: jax.Array, proj: jax.Array) -> tuple[jax.Array, jax.Array]:
  c = gram - proj @ gram
  c = c - c @ proj
  ev, vec = jnp.linalg.eigh(0.5 * (c + c.T))
  return vec[:, ::-1] * (jnp.arange(vec.shape[-1]) < 5), jnp.sqrt(jnp.maximum(ev[::-1], 0.0))


def per_matrix(w: jax.Array, c: jax.Array, pu: jax.Array, pv: jax.Array) -> tuple[jax.Array, ...]:
  b_new, spectrum = _top(c, pv)
  a_new, _ = _top(w @ c @ w.T, pu)
  a_new = a_new - pu @ a_new
  b_new = b_new - pv @ b_new
  q_left = jnp.linalg.eigh(pu + a_new @ a_new.T)[1]
  q_right = jnp.linalg.eigh(pv + b_new @ b_new.T)[1]
  return q_left[:, ::-1][:, :32], q_right[:, ::-1][:, :32], spectrum


def main(mode: str, rounds: int = 6) -> None:
  if mode == "vmap":
    boundary = jax.jit(jax.vmap(per_matrix))
  elif mode == "map":
    boundary = jax.jit(lambda *a: jax.lax.map(lambda xs: per_matrix(*xs), a))
  elif mode == "library":
    from clsvd_jax._src import linalg

    boundary = jax.jit(lambda *a: linalg.map_matrices(per_matrix, *a))
  else:
    raise SystemExit(f"mode must be vmap, map or library, got {mode!r}")
  produce = jax.jit(lambda x, s: jnp.einsum("lbtn,lbtm->lnm", jnp.tanh(x * s), jnp.tanh(x * s)))
  key = jax.random.key(0)
  t0 = time.time()
  for r in range(rounds):
    outs = []
    for i, (layers, m, n) in enumerate(SHAPES):
      x = jax.random.normal(jax.random.fold_in(key, i), (layers, 8, 64, n))
      w = 0.05 * jax.random.normal(jax.random.fold_in(key, 100 + i), (layers, m, n))
      pu = jnp.broadcast_to(jnp.diag((jnp.arange(m) < 3).astype(jnp.float32)), (layers, m, m))
      pv = jnp.broadcast_to(jnp.diag((jnp.arange(n) < 3).astype(jnp.float32)), (layers, n, n))
      outs.append(boundary(w, produce(x, 1.0 + r), pu, pv))
    jax.block_until_ready(outs)
  print(f"ok {time.time() - t0:.1f}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "library", int(sys.argv[2]) if len(sys.argv) > 2 else 6)
