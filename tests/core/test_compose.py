"""constrained() composes with optax: chain, inject_hyperparams, MultiSteps, partition, schedules, bf16, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clsvd_jax as cj

TOL = 1e-5


def _params():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "layers": {"attn": {"weight": jax.random.normal(k1, (2, 8, 6))}, "norm": {"scale": jnp.ones((2, 6))}},
      "head": {"weight": jax.random.normal(k2, (6, 10))},
      "embed": {"embedding": jax.random.normal(k3, (5, 6))},
  }


RANKS = {"layers/attn/weight": np.array([2, 4], np.int32), "head/weight": 3}


def _grads(params, key):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _check_invariant(params0, params1, subs):
  for path, sub in cj.flatten_with_paths(subs, is_leaf=lambda x: isinstance(x, cj.Subspace)).items():
    if not isinstance(sub, cj.Subspace):
      continue
    w0 = cj.flatten_with_paths(params0)[path].astype(jnp.float32)
    w1 = cj.flatten_with_paths(params1)[path].astype(jnp.float32)
    dw = (w1 - w0).reshape((-1,) + w0.shape[-2:])
    u = cj.protected_basis(sub, "left").reshape((-1,) + (w0.shape[-2],) * 2)
    v = cj.protected_basis(sub, "right").reshape((-1,) + (w0.shape[-1],) * 2)
    for ui, vi, di in zip(u, v, dw):
      norm = float(jnp.linalg.norm(di))
      assert norm > 0, path
      assert float(jnp.linalg.norm(ui.T @ di)) <= TOL * norm * 10, path
      assert float(jnp.linalg.norm(di @ vi)) <= TOL * norm * 10, path


def _train(tx, params, steps=12, subs=None):
  state = tx.init(params)
  if subs is not None:
    state = cj.set_subspaces(state, subs)

  @jax.jit
  def step(p, s, key):
    u, s = tx.update(_grads(p, key), s, p)
    return optax.apply_updates(p, u), s

  p = params
  for key in jax.random.split(jax.random.PRNGKey(1), steps):
    p, state = step(p, state, key)
  return p, state


def _matrices_only(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def test_chain_with_clipping_and_schedule():
  params = _params()
  subs = cj.compute_subspaces(params, RANKS)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 12)
  tx = optax.chain(optax.clip_by_global_norm(1.0), cj.constrained(optax.adamw(schedule, weight_decay=0.1)))
  p1, _ = _train(tx, params, subs=subs)
  _check_invariant(params, p1, subs)
  # Leaves without a subspace are trained like plain adamw.
  assert float(jnp.abs(p1["layers"]["norm"]["scale"] - 1).max()) > 0


def test_inject_hyperparams_and_subspaces_swap_through_it():
  params = _params()
  tx = optax.inject_hyperparams(lambda learning_rate: cj.constrained(optax.adam(learning_rate)))(learning_rate=1e-2)
  subs = cj.compute_subspaces(params, RANKS)
  p1, state = _train(tx, params, subs=subs)
  _check_invariant(params, p1, subs)
  state.hyperparams["learning_rate"] = jnp.asarray(5e-3)
  got = cj.get_subspaces(state)
  np.testing.assert_array_equal(np.asarray(got["head"]["weight"].rank), 3)


def test_multisteps_accumulates_projected_updates():
  params = _params()
  subs = cj.compute_subspaces(params, RANKS)
  tx = optax.MultiSteps(cj.constrained(optax.adamw(1e-2, weight_decay=0.1)), every_k_schedule=3)
  p1, _ = _train(tx, params, steps=9, subs=subs)
  _check_invariant(params, p1, subs)


def test_partition_by_param_policy_freezes_and_constrains():
  params = _params()
  policy = cj.ParamPolicy(rules=((r"attn/weight$", "constrain"), (r"head/weight$", "constrain"),
                                 (r"norm/scale$", "train")), default="freeze")
  tx = policy.partition(cj.constrained(optax.adamw(1e-2, weight_decay=0.1)), train=optax.adam(1e-2))
  subs = cj.compute_subspaces(params, RANKS)
  p1, state = _train(tx, params, subs=subs)
  _check_invariant(params, p1, subs)
  np.testing.assert_array_equal(np.asarray(p1["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))
  assert float(jnp.abs(p1["layers"]["norm"]["scale"] - 1).max()) > 0
  got = cj.get_subspaces(state)
  np.testing.assert_array_equal(np.asarray(got["layers"]["attn"]["weight"].rank), [2, 4])


def test_partition_without_train_transform_is_a_clear_error():
  policy = cj.ParamPolicy(rules=((r"norm", "train"),))
  with pytest.raises(ValueError, match="labels some parameters 'train'"):
    policy.partition(cj.constrained(optax.adam(1e-2))).init(_params())


def test_bf16_params_keep_bf16_updates():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  subs = cj.compute_subspaces(params, RANKS)
  tx = cj.constrained(optax.adamw(1e-2), mask=_matrices_only)
  state = cj.set_subspaces(tx.init(params), subs)
  updates, _ = tx.update(_grads(params, jax.random.PRNGKey(2)), state, params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.bfloat16
  # Bases are float32 and the projection runs in float32: only the final bf16 rounding leaks.
  _check_invariant_bf16(updates, subs)


def _check_invariant_bf16(updates, subs):
  u = updates["head"]["weight"].astype(jnp.float32)
  basis = cj.protected_basis(subs["head"]["weight"], "right")[:, :3]
  assert float(jnp.linalg.norm(u @ basis)) <= 1e-2 * float(jnp.linalg.norm(u))


def test_jit_with_donated_buffers_and_no_recompile_on_subspace_swap():
  params = _params()
  tx = cj.constrained(optax.adamw(1e-2, weight_decay=0.1), mask=_matrices_only)
  traces = []

  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  jstep = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  p = jax.tree.map(jnp.copy, params)
  for task, (k_layers, k_head) in enumerate([(0, 0), (1, 2), (2, 4), (4, 5)]):
    w_now = jax.tree.map(jnp.copy, p)
    ranks = {"layers/attn/weight": np.array([k_layers, k_layers + 1], np.int32), "head/weight": k_head}
    # The state is donated, so the previous subspaces are read back from it rather than kept aside.
    previous = cj.compute_subspaces(w_now, ranks, previous=cj.get_subspaces(state))
    state = cj.set_subspaces(state, previous)
    kept = jax.tree.map(jnp.copy, previous)
    for key in jax.random.split(jax.random.PRNGKey(task), 3):
      p, state = jstep(p, state, _grads(w_now, key))
    _check_invariant(w_now, p, kept)
    previous = kept
  # Ranks 0..5 crossed the protect/allow flip (capacity 3 on the head's 6-dim side) without a single retrace.
  assert len(traces) == 1
  assert bool(previous["head"]["weight"].left_allow) and bool(previous["layers"]["attn"]["weight"].left_allow[1])


def test_set_subspaces_rejects_other_shapes_and_unknown_slots():
  params = _params()
  tx = cj.constrained(optax.adam(1e-2), mask=lambda p: jax.tree.map(lambda x: x.ndim == 3, p))
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"'head/weight' has no subspace slot"):
    cj.set_subspaces(state, cj.compute_subspaces(params, RANKS))
  other = cj.compute_subspaces(params, {"layers/attn/weight": np.array([1, 1], np.int32)}, capacity=2)
  with pytest.raises(ValueError, match=r"subspace of 'layers/attn/weight': field 'left' has shape \(2, 8, 2\)"):
    cj.set_subspaces(state, other)
  with pytest.raises(ValueError, match="holds no constrained"):
    cj.set_subspaces(optax.adam(1e-2).init(params), other)


def test_init_with_mismatched_subspaces_names_the_parameter():
  params = _params()
  subs = cj.compute_subspaces({"head": {"weight": jnp.ones((7, 10))}}, {"head/weight": 1})
  with pytest.raises(ValueError, match=r"subspace of 'head/weight' is for shape \(7, 10\)"):
    cj.constrained(optax.adam(1e-2), subspaces=subs).init(params)


def test_mask_selecting_a_vector_is_an_error():
  with pytest.raises(ValueError, match=r"'layers/norm/scale' has shape \(6,\): only matrices"):
    cj.constrained(optax.adam(1e-2), mask={"layers": {"attn": {"weight": True}, "norm": {"scale": True}},
                                           "head": {"weight": True}, "embed": {"embedding": False}}).init(
        {**_params(), "layers": {"attn": {"weight": jnp.ones((2, 8, 6))}, "norm": {"scale": jnp.ones(6)}}})


def test_unknown_sides_is_an_error():
  with pytest.raises(ValueError, match="unknown sides='diag'"):
    cj.constrained(optax.adam(1e-2), sides="diag")
