"""The projection's matmul precision: a per-backend default chosen when the step is lowered, an explicit override,
and the accelerators' defaults keeping the invariant (their pass schemes emulated bit-exactly on CPU)."""

import importlib.util
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clsvd_jax as cj
from clsvd_jax._src import subspace as subspace_lib

_P = jax.lax.Precision


def _problem():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 48, 40))
  subs = cj.compute_subspaces({"w": w}, {"w": np.array([6, 20, 35], np.int32)})
  g = jax.random.normal(jax.random.PRNGKey(1), w.shape)
  return w, subs, g


def test_default_precision_per_platform(monkeypatch):
  assert cj.default_precision("cpu") == _P.HIGHEST
  assert cj.default_precision("rocm") == _P.HIGHEST
  assert cj.default_precision("tpu") == _P.HIGH
  monkeypatch.setattr(subspace_lib, "_cuda_has_tf32", lambda: True)
  assert cj.default_precision("cuda") == jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  # Pre-Ampere GPUs refuse TF32 algorithms at compile time: float32 there.
  monkeypatch.setattr(subspace_lib, "_cuda_has_tf32", lambda: False)
  assert cj.default_precision("cuda") == _P.HIGHEST


def test_default_on_cpu_is_highest_bit_for_bit():
  _, subs, g = _problem()
  for sides in subspace_lib.SIDES:
    auto = jax.jit(lambda g, s, sides=sides: cj.project(g, s, sides))(g, subs["w"])
    highest = jax.jit(lambda g, s, sides=sides: cj.project(g, s, sides, precision="highest"))(g, subs["w"])
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(highest))


def _lowered_dots(platform, fn, *args):
  text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
  return [line for line in text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_lowered_step_carries_the_platforms_precision(monkeypatch, platform):
  """The jitted constrained update, lowered for each accelerator, runs every projection matmul at its default."""
  monkeypatch.setattr(subspace_lib, "_cuda_has_tf32", lambda: True)
  w, subs, g = _problem()
  tx = cj.constrained(optax.adamw(1e-3), subspaces=subs)
  state = tx.init({"w": w})
  dots = _lowered_dots(platform, lambda g, st, p: tx.update(g, st, p)[0], {"w": g}, state, {"w": w})
  assert len(dots) >= 8  # two projections x two sides x two thin matmuls
  if platform == "tpu":
    assert all("precision = [HIGH, HIGH]" in d for d in dots), dots[0]
  else:
    algo = re.compile(r"lhs_precision_type = tf32, rhs_precision_type = tf32, accumulation_type = f32.*"
                      r"num_primitive_operations = 3")
    assert all(algo.search(d) for d in dots), dots[0]


def test_an_explicit_precision_reaches_every_matmul(monkeypatch):
  monkeypatch.setattr(subspace_lib, "_cuda_has_tf32", lambda: False)  # the default would be HIGHEST
  w, subs, g = _problem()
  tx = cj.constrained(optax.sgd(0.1), subspaces=subs, precision="high")
  state = tx.init({"w": w})
  dots = _lowered_dots("cuda", lambda g, st, p: tx.update(g, st, p)[0], {"w": g}, state, {"w": w})
  assert dots and all("precision = [HIGH, HIGH]" in d for d in dots)
  np.testing.assert_array_equal(  # and on CPU it is still float32
      np.asarray(tx.update({"w": g}, state, {"w": w})[0]["w"]),
      np.asarray(cj.constrained(optax.sgd(0.1), subspaces=subs).update({"w": g}, state, {"w": w})[0]["w"]))


@pytest.mark.parametrize("bad", ["fastest-ever", 3, "tf32"])
def test_a_bad_precision_is_refused_when_the_optimizer_is_built(bad):
  with pytest.raises(ValueError, match="precision=.*is not a matmul precision.*DotAlgorithmPreset"):
    cj.constrained(optax.sgd(0.1), precision=bad)


def test_the_accelerator_defaults_keep_the_invariant_where_single_pass_breaks_it():
  """``benchmarks/precision.py`` on a small stack: the scheme standing for each platform's default leaves the
  runner's ``invariant_max`` below 1e-5 after 20 AdamW steps; one bf16 or TF32 pass does not (so the choice is not
  vacuous)."""
  path = Path(__file__).resolve().parents[2] / "benchmarks" / "precision.py"
  spec = importlib.util.spec_from_file_location("precision_bench", path)
  bench = importlib.util.module_from_spec(spec)
  sys.modules["precision_bench"] = bench
  spec.loader.exec_module(bench)
  defaults = {p: bench.LIBRARY_DEFAULT[p] for p in ("tpu", "cuda")}  # CPU's is HIGHEST, tested bit for bit above
  rows = bench.main(["--d", "48", "--layers", "2", "--tokens", "256", "--steps", "20", "--repeats", "1",
                     "--protected", "0.5", "--json", "--schemes", *defaults.values(), "x1)"])
  leak = {r["scheme"]: r["leak"] for r in rows}
  assert len(leak) == 4
  for platform, scheme in defaults.items():
    assert leak[scheme] <= 1e-5, (platform, scheme, leak[scheme])
  assert leak["emulated TPU DEFAULT (bf16 x1)"] > 1e-4
  assert leak["emulated GPU DEFAULT/HIGH (tf32 x1)"] > 1e-5
  assert jnp.isfinite(jnp.asarray(list(leak.values()))).all()
