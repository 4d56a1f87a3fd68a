"""Matrix decompositions over stacks of matrices that never nest parallel work in XLA's CPU thread pool.

Why this module exists: jaxlib's CPU kernels for a *batch* of eigh / SVD problems (``lapack_ssyevd_ffi``,
``lapack_sgesdd_ffi``) split the batch over XLA's intra-op thread pool and block the calling pool thread until the
pieces are done (``jax::ParallelBatchMap``). XLA's thunk executor runs independent thunks of one program, and the
continuations of programs waiting on each other, on that same pool. When two batched decompositions run at once on
a 2-thread pool, both threads wait for work queued behind themselves and the process stops at 0% CPU: seen at the
second or third task boundary of ``configs/cpu_small.yaml`` on 2 cores (``tests/core/test_linalg.py`` keeps a
reproducer of that wedge with plain JAX).

So on CPU every decomposition here runs one matrix at a time (``lax.map``: a batch of one runs inline in the calling
thread, nothing is queued) and on GPU / TPU the whole stack goes to the device's batched solver. The choice is made
when the program is lowered (``lax.platform_dependent``), so one jitted function serves every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def map_matrices(fn: Callable[..., Any], *args: Any) -> Any:
  """``fn`` applied to every slice along the leading axis of ``args`` (a pytree of arrays with that axis).

  Batched (``vmap``) on accelerators, one slice at a time (``lax.map``) on CPU. Use it for any per-matrix function
  that contains a decomposition; a ``vmap`` around a decomposition would batch it again.
  """
  return jax.lax.platform_dependent(
      *args, cpu=lambda *a: jax.lax.map(lambda xs: fn(*xs), a), default=jax.vmap(fn))


def _over_batch(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """``fn`` of one matrix over the leading batch axes of ``x`` ([..., m, n]), see ``map_matrices``."""
  batch = x.shape[:-2]
  if not batch:
    return fn(x)
  out = map_matrices(fn, x.reshape((-1,) + x.shape[-2:]))
  return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)


def eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``jnp.linalg.eigh`` (ascending eigenvalues, eigenvectors as columns) of ``[..., n, n]``."""
  return _over_batch(jnp.linalg.eigh, x)


def eigvalsh(x: jax.Array) -> jax.Array:
  """``jnp.linalg.eigvalsh`` (ascending) of ``[..., n, n]``."""
  return _over_batch(jnp.linalg.eigvalsh, x)


def svd(x: jax.Array, *, compute_uv: bool = True) -> Any:
  """Thin ``jnp.linalg.svd`` of ``[..., m, n]``: ``(u, s, vh)``, or ``s`` alone without ``compute_uv``."""
  return _over_batch(lambda a: jnp.linalg.svd(a, full_matrices=False, compute_uv=compute_uv), x)
