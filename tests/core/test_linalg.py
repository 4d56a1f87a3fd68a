"""Decompositions over stacks of matrices (``clsvd_jax._src.linalg``): same results as ``jnp.linalg``, and no wedge
of XLA's CPU thread pool when several run at once (the task-boundary hang of issue 8)."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsvd_jax._src import linalg

WEDGE = Path(__file__).with_name("_eigh_wedge.py")


def _sym(shape, seed=0):
  a = jax.random.normal(jax.random.key(seed), shape)
  return a @ jnp.swapaxes(a, -1, -2)


def test_eigh_eigvalsh_svd_match_jnp_on_stacks_and_single_matrices():
  for shape in [(6, 6), (3, 6, 6), (2, 2, 5, 5)]:
    x = _sym(shape)
    w, v = jax.jit(linalg.eigh)(x)
    w_ref = jnp.linalg.eigvalsh(x)
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(linalg.eigvalsh)(x), w_ref, rtol=1e-4, atol=1e-4)
    # Eigenvectors up to sign: the reconstruction is what is defined.
    rebuilt = jnp.einsum("...ij,...j,...kj->...ik", v, w, v)
    np.testing.assert_allclose(rebuilt, x, rtol=1e-4, atol=1e-3)
  for shape in [(7, 4), (3, 4, 7), (2, 3, 5, 4)]:
    x = jax.random.normal(jax.random.key(1), shape)
    u, s, vh = jax.jit(linalg.svd)(x)
    assert u.shape == shape[:-1] + (min(shape[-2:]),) and vh.shape == shape[:-2] + (min(shape[-2:]), shape[-1])
    np.testing.assert_allclose(s, jnp.linalg.svd(x, compute_uv=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.einsum("...ik,...k,...kj->...ij", u, s, vh), x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(lambda a: linalg.svd(a, compute_uv=False))(x), s, rtol=1e-6, atol=1e-6)


def test_map_matrices_equals_vmap():
  fn = lambda a, b: (jnp.linalg.eigvalsh(a) * b, jnp.trace(a))
  xs, bs = _sym((4, 5, 5), seed=3), jnp.arange(4.0)
  got = jax.jit(lambda a, b: linalg.map_matrices(fn, a, b))(xs, bs)
  want = jax.vmap(fn)(xs, bs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.multiprocess
def test_boundary_sized_decompositions_finish_when_two_processes_run_them_at_once():
  # The plain-JAX reproducer of the wedge (``python tests/core/_eigh_wedge.py vmap`` stops at 0% CPU on two
  # threads), run as the library runs it, twice at once on two CPUs: each must finish.
  cmd = [sys.executable, str(WEDGE), "library", "2"]
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=480)
      outs.append((p.returncode, out, err[-2000:]))
  finally:
    for p in procs:
      p.kill()
  for code, out, err in outs:
    assert code == 0 and out.startswith("ok"), (code, out, err)
