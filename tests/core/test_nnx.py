"""Flax NNX users (issue 12): nnx.Optimizer end to end, nnx containers, [in, out] kernels and >2-axis kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clsvd_jax as cj

TOL = 1e-5


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(12, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 6, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class Attention(nnx.Module):
  """Kernels with three axes: q [embed, heads, head_dim] and o [heads, head_dim, embed]."""

  def __init__(self, rngs):
    self.q = nnx.Einsum("bte,ehd->bthd", (8, 2, 3), rngs=rngs)
    self.o = nnx.Einsum("bthd,hde->bte", (2, 3, 8), rngs=rngs)

  def __call__(self, x):
    return self.o(jnp.tanh(self.q(x)))


def _kernels(model):
  return {p: np.asarray(v) for p, v in cj.flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
          if p.endswith("kernel")}


def _bases(sub):
  k = int(np.max(np.asarray(sub.rank)))
  return np.asarray(cj.protected_basis(sub, "left"))[..., :k], np.asarray(cj.protected_basis(sub, "right"))[..., :k]


def _rel(x, ref):
  return float(np.linalg.norm(x) / max(np.linalg.norm(ref), 1e-30))


def _make_step():
  traces = []

  @nnx.jit
  def step(model, opt, x, y):
    traces.append(1)
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)

  return step, traces


def test_nnx_optimizer_three_tasks_accumulate_on_in_out_kernels():
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, cj.constrained(optax.adamw(1e-2, weight_decay=0.1)), wrt=nnx.Param)
  step, traces = _make_step()
  previous = None
  for task, (k1, k2) in enumerate([(3, 2), (6, 3), (9, 5)]):
    subs = cj.compute_subspaces(nnx.state(model, nnx.Param), {"l1/kernel": k1, "l2/kernel": k2},
                                previous=cj.get_subspaces(opt.opt_state))
    opt.opt_state = cj.set_subspaces(opt.opt_state, subs)
    before = _kernels(model)
    x = jax.random.normal(jax.random.PRNGKey(task), (24, 12))
    for _ in range(15):
      step(model, opt, x, jnp.sin(3.0 * x[:, :6] + task))
    after = _kernels(model)
    for name, k in (("l1", k1), ("l2", k2)):
      sub = subs[name]["kernel"]
      assert int(sub.rank) == k and sub.matrix_shape == after[f"{name}/kernel"].shape[::-1]
      u, v = _bases(sub)  # u: outputs (the kernel's columns), v: inputs (its rows)
      dw = after[f"{name}/kernel"] - before[f"{name}/kernel"]
      assert np.linalg.norm(dw) > 1e-3, name
      assert _rel(dw @ u, dw) <= TOL and _rel(v.T @ dw, dw) <= TOL, name
      if previous is not None:  # the old subspace is kept exactly
        u_old, v_old = _bases(previous[name]["kernel"])
        assert np.linalg.norm(u_old - u @ (u.T @ u_old)) < 1e-5 and np.linalg.norm(v_old - v @ (v.T @ v_old)) < 1e-5
    previous = subs
  assert len(traces) == 1  # three subspace swaps, ranks crossing the stored-form flip, one compilation
  assert isinstance(cj.get_subspaces(opt.opt_state)["l1"]["kernel"], cj.Subspace)


def test_nnx_state_pure_dict_and_plain_dict_give_the_same_subspaces():
  model = MLP(nnx.Rngs(1))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  ranks = {"l1/kernel": 4, "l2/kernel": 2}
  opt = nnx.Optimizer(model, cj.constrained(optax.adam(1e-2)), wrt=nnx.Param)
  results = []
  for params in (state, pure, {"l1": dict(pure["l1"]), "l2": dict(pure["l2"])}):
    first = cj.compute_subspaces(params, ranks, previous=cj.get_subspaces(opt.opt_state))
    grown = cj.compute_subspaces(params, {"l1/kernel": 6, "l2/kernel": 3}, previous=first)
    cj.set_subspaces(opt.opt_state, grown)  # every form fits the nnx.Optimizer's state
    cj.set_subspaces(cj.constrained(optax.adam(1e-2)).init(pure), grown)  # ... and a plain optax state
    results.append(cj.flatten_with_paths(grown, is_leaf=lambda x: isinstance(x, cj.Subspace)))
  for other in results[1:]:
    assert other.keys() == results[0].keys()
    for path, sub in results[0].items():
      for a, b in zip(jax.tree.leaves(sub), jax.tree.leaves(other[path])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("sides", ["both", "left", "right", "block"])
def test_each_variant_invariant_on_in_out_kernel_equals_the_transposed_out_in_run(sides):
  """A [in, out] kernel behaves exactly as its [out, in] transpose: same bases, same updates (transposed)."""
  kernel = jax.random.normal(jax.random.PRNGKey(2), (12, 8))  # [in, out]
  ranks = 3
  ref = {"weight": kernel.T}
  subs_k = cj.compute_subspaces({"kernel": kernel}, {"kernel": ranks})
  subs_w = cj.compute_subspaces(ref, {"weight": ranks})
  for a, b in zip(jax.tree.leaves(subs_k), jax.tree.leaves(subs_w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  tx_k = cj.constrained(optax.adamw(1e-2, weight_decay=0.1), sides=sides)
  tx_w = cj.constrained(optax.adamw(1e-2, weight_decay=0.1), sides=sides)
  pk, pw = {"kernel": kernel}, ref
  sk = cj.set_subspaces(tx_k.init(pk), subs_k)
  sw = cj.set_subspaces(tx_w.init(pw), subs_w)
  for key in jax.random.split(jax.random.PRNGKey(3), 30):
    g = jax.random.normal(key, (12, 8)) + 0.5 * pk["kernel"]
    uk, sk = tx_k.update({"kernel": g}, sk, pk)
    uw, sw = tx_w.update({"weight": g.T}, sw, pw)
    pk, pw = optax.apply_updates(pk, uk), optax.apply_updates(pw, uw)
  np.testing.assert_allclose(np.asarray(pk["kernel"]), np.asarray(pw["weight"]).T, atol=1e-5)
  dw = np.asarray(pk["kernel"] - kernel)
  u, v = _bases(subs_k["kernel"])  # u spans outputs (kernel columns), v inputs (kernel rows)
  assert _rel(v.T @ dw @ u, dw) <= TOL
  assert (_rel(dw @ u, dw) <= TOL) == (sides in ("both", "left"))
  assert (_rel(v.T @ dw, dw) <= TOL) == (sides in ("both", "right"))


def test_activation_covariance_protects_old_inputs_of_an_in_out_kernel():
  rng = np.random.RandomState(0)
  x_old = rng.randn(64, 3) @ rng.randn(3, 10)  # inputs in a 3-dim subspace of R^10
  k0 = jnp.asarray(rng.randn(10, 6), jnp.float32)  # [in, out]: y = x @ K
  subs = cj.compute_subspaces({"kernel": k0}, {"kernel": 3}, covariances={"kernel": x_old.T @ x_old})
  tx = cj.constrained(optax.adam(5e-2), sides="right")
  params = {"kernel": k0}
  state = cj.set_subspaces(tx.init(params), subs)
  for key in jax.random.split(jax.random.PRNGKey(0), 20):
    u, state = tx.update({"kernel": jax.random.normal(key, (10, 6))}, state, params)
    params = optax.apply_updates(params, u)
  k1 = np.asarray(params["kernel"])
  assert np.abs(k1 - np.asarray(k0)).max() > 0.3
  np.testing.assert_allclose(x_old @ k1, x_old @ np.asarray(k0), atol=1e-4)
  with pytest.raises(ValueError, match=r"covariance of 'kernel' has shape \(6, 6\); expected \(10, 10\)"):
    cj.compute_subspaces({"kernel": k0}, {"kernel": 3}, covariances={"kernel": np.eye(6)})


def test_capacity_and_rank_cap_are_per_output_and_input_side():
  kernel = jnp.ones((16, 6))  # [in 16, out 6]
  sub = cj.compute_subspaces({"kernel": kernel}, {"kernel": 2}, capacity=(2, 5))["kernel"]
  assert sub.left.shape == (6, 2) and sub.right.shape == (16, 5)  # left = outputs, right = inputs
  assert cj.init_subspaces({"kernel": kernel})["kernel"].capacity == cj.default_capacity(6, 16)
  with pytest.raises(ValueError, match=r"\[0, min\(m, n\)\] = \[0, 6\]"):
    cj.compute_subspaces({"kernel": kernel}, {"kernel": 7})


def test_three_axis_kernel_is_refused_by_default_with_how_to_declare_it():
  model = Attention(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'o/kernel' is a kernel with 3 axes \(2, 3, 8\).*MatrixAxes\(input="):
    nnx.Optimizer(model, cj.constrained(optax.adam(1e-2)), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"'q/kernel' is a kernel with 3 axes.*nnx_matrix_axes"):
    cj.compute_subspaces(nnx.state(model, nnx.Param), {"q/kernel": 1})


def test_einsum_kernels_are_their_two_dimensional_linear_maps():
  model = Attention(nnx.Rngs(0))
  axes = cj.nnx_matrix_axes(model)
  assert axes == {"q/kernel": cj.MatrixAxes(input=(0,), output=(1, 2)),
                  "o/kernel": cj.MatrixAxes(input=(0, 1), output=(2,))}
  # The [out, in] matrices the subspaces protect, built independently of the library.
  as_matrix = {"q/kernel": lambda k: k.reshape(8, 6).T, "o/kernel": lambda k: k.reshape(6, 8).T}
  opt = nnx.Optimizer(model, cj.constrained(optax.adamw(1e-2, weight_decay=0.1), axes=axes), wrt=nnx.Param)
  subs = cj.compute_subspaces(nnx.state(model, nnx.Param), {"q/kernel": 3, "o/kernel": 2}, axes=axes,
                              previous=cj.get_subspaces(opt.opt_state))
  before = _kernels(model)
  for path, f in as_matrix.items():
    sub = cj.flatten_with_paths(subs, is_leaf=lambda x: isinstance(x, cj.Subspace))[path]
    u, v = _bases(sub)
    s = np.linalg.svd(f(before[path]), compute_uv=False)
    k = u.shape[1]
    np.testing.assert_allclose(np.linalg.svd(u.T @ f(before[path]) @ v, compute_uv=False), s[:k], rtol=1e-4)
  opt.opt_state = cj.set_subspaces(opt.opt_state, subs)
  step, _ = _make_step()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 8))
  for _ in range(10):
    step(model, opt, x, jnp.cos(2.0 * x))
  after = _kernels(model)
  for path, f in as_matrix.items():
    sub = cj.flatten_with_paths(subs, is_leaf=lambda x: isinstance(x, cj.Subspace))[path]
    u, v = _bases(sub)
    dw = f(after[path]) - f(before[path])
    assert np.linalg.norm(dw) > 1e-3
    assert _rel(u.T @ dw, dw) <= TOL and _rel(dw @ v, dw) <= TOL, path


def test_stacked_linear_from_nnx_vmap_is_a_stack_of_matrices():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(6, 4, rngs=nnx.Rngs(key))

  stack = make(jax.random.split(jax.random.PRNGKey(0), 3))
  axes = cj.nnx_matrix_axes(stack)
  assert axes == {"kernel": cj.MatrixAxes(input=-2, output=-1)}
  params = nnx.to_pure_dict(nnx.state(stack, nnx.Param))
  ranks = np.array([0, 1, 3], np.int32)
  sub = cj.compute_subspaces(params, {"kernel": ranks}, axes=axes)["kernel"]
  np.testing.assert_array_equal(np.asarray(sub.rank), ranks)
  assert sub.matrix_shape == (4, 6)
  with pytest.raises(ValueError, match="kernel with 3 axes"):
    cj.compute_subspaces(params, {"kernel": ranks})


def test_matrix_axes_errors_name_the_parameter():
  params = {"w": jnp.ones((4, 3, 2))}
  with pytest.raises(ValueError, match=r"'w'.*must be distinct"):
    cj.compute_subspaces(params, {"w": 1}, axes=cj.MatrixAxes(input=0, output=(0, 1)))
  with pytest.raises(ValueError, match=r"'w' has 3 axes.*input=5"):
    cj.constrained(optax.sgd(1.0), axes=cj.MatrixAxes(input=5, output=0)).init(params)
  with pytest.raises(ValueError, match=r"axes name parameters that do not exist: \['v'\]"):
    cj.compute_subspaces(params, {"w": 1}, axes={"v": cj.IN_OUT})
  with pytest.raises(ValueError, match=r"einsum 'ab,bc->a'.*summed away"):
    cj.einsum_axes("ab,bc->a")


def test_axes_mismatch_between_optimizer_and_subspaces_is_reported():
  params = {"kernel": jnp.ones((6, 4))}
  subs = cj.compute_subspaces(params, {"kernel": 1}, axes=cj.OUT_IN)  # [6, 4] read as [out, in]
  pattern = r"'kernel' is for a \(6, 4\) \[\.\.\., out, in\] matrix, .* slot for \(4, 6\).*same `axes`"
  with pytest.raises(ValueError, match=pattern):
    cj.set_subspaces(cj.constrained(optax.sgd(1.0)).init(params), subs)


def test_bases_do_not_inherit_the_kernels_sharding_metadata():
  # nnx.Optimizer copies a Variable's metadata (its sharding) onto the state leaves made from it; a basis [m, c]
  # or a rank scalar sharded like a [in, out] kernel would be wrong, so the bases are plain arrays in the state.
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("a", "b"))
  with jax.set_mesh(jax.make_mesh((1, 1), ("a", "b"))):
    model = nnx.Linear(8, 6, kernel_init=init, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, cj.constrained(optax.adam(1e-2)), wrt=nnx.Param)
  assert opt.opt_state.inner_state[0].mu["kernel"].get_metadata()["out_sharding"] == ("a", "b")  # what flax does
  sub = opt.opt_state.subspaces["kernel"]
  assert isinstance(sub, cj.Subspace)
  for leaf in sub:
    assert "out_sharding" not in leaf.get_metadata()


def test_rank_policies_take_the_matrix_view_of_any_layout():
  model = Attention(nnx.Rngs(0))
  axes = cj.nnx_matrix_axes(model)
  params = nnx.state(model, nnx.Param)
  shapes = cj.matrix_shapes(params, axes=axes, mask=lambda p: jax.tree.map(lambda x: x.ndim == 3, p))
  assert shapes == {"q/kernel": (6, 8), "o/kernel": (8, 6)}
  ranks = cj.schedule_ranks(5, shapes, rate=0.1)  # ratio 0.5 of min(m, n) = 6
  assert {p: int(k) for p, k in ranks.items()} == {"q/kernel": 3, "o/kernel": 3}
  subs = cj.compute_subspaces(params, ranks, axes=axes)
  assert int(subs["q"]["kernel"].rank) == 3 and subs["o"]["kernel"].matrix_shape == (8, 6)


def test_a_subspace_stored_as_an_nnx_state_inside_a_variable_is_still_read_and_projected():
  # The form nnx.update leaves when a whole Subspace sits in one OptVariable (as this library stored it before):
  # it must not be mistaken for "no subspace" (that would skip the projection silently).
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 4))}
  sub = cj.compute_subspaces(params, {"w": 2})["w"]
  stored = nnx.training.optimizer.OptVariable(nnx.State({f: getattr(sub, f) for f in cj.Subspace._fields}))
  tx = cj.constrained(optax.sgd(1.0))
  state = tx.init(params)._replace(subspaces={"w": stored})
  assert int(cj.get_subspaces(state)["w"].rank) == 2
  g = {"w": jax.random.normal(jax.random.PRNGKey(1), (6, 4))}
  u, _ = tx.update(g, state, params)
  np.testing.assert_allclose(np.asarray(u["w"]), -np.asarray(cj.project(g["w"], sub)), atol=1e-6)
  grown = cj.compute_subspaces(params, {"w": 3}, previous=cj.get_subspaces(state))
  swapped = cj.set_subspaces(state, grown)
  assert type(swapped.subspaces["w"]) is type(stored)  # the container is kept
  assert int(cj.get_subspaces(swapped)["w"].rank) == 3


def test_nnx_matrix_axes_reads_linear_general_and_embed():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 6, rngs=rngs)
      self.proj = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=rngs)  # kernel [2, 3, 5]: (2 3) -> 5

  net = Net(nnx.Rngs(0))
  axes = cj.nnx_matrix_axes(net)
  assert axes == {"embed/embedding": cj.MatrixAxes(input=-2, output=-1),
                  "proj/kernel": cj.MatrixAxes(input=(0, 1), output=(2,))}
  kernel = np.asarray(net.proj.kernel[...])
  sub = cj.compute_subspaces(nnx.state(net, nnx.Param), {"proj/kernel": 5}, axes=axes)["proj"]["kernel"]
  # Rank 5 of the 5 x 6 map protects every output: the left basis spans all of R^5, and the kept singular values
  # are those of the [out, in] matrix built by hand.
  u = np.asarray(cj.protected_basis(sub, "left"))
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
  v = np.asarray(cj.protected_basis(sub, "right"))[:, :5]
  matrix = kernel.reshape(6, 5).T
  np.testing.assert_allclose(np.linalg.svd(u.T @ matrix @ v, compute_uv=False), np.linalg.svd(matrix, compute_uv=False),
                             rtol=1e-4)
