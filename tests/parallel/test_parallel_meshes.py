"""Sharded constrained training on 8 CPU devices: meshes (8,1,1), (2,2,2), (1,4,2) against one device, bases laid
out as their weights, nothing large replicated, boundary memory, and a checkpoint saved on 8 devices resumed on 4
and on 1. In-process: tests/conftest.py gives the suite 8 host devices; the checks run once per module (a fixture)
because each CPU compile is slow."""

import time

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

import clsvd_jax
from clsvd_jax import flatten_with_paths
from clsvd_jax.parallel import checkpoint, make_mesh, opt_state, rules, selfcheck, train_step

pytestmark = pytest.mark.slow

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
PROBE = "layers/self_attn/q_proj/weight"


def spec_list(spec):
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def _run_meshes(ckpt_dir):
  """Every multi-device check, once per module: the CPU compiles dominate and are shared by the three tests."""
  report = {"meshes": {}, "timings": {}}
  t0 = time.time()
  problem = selfcheck.Problem()
  with jax.default_device(jax.devices()[0]):
    reference = selfcheck.run_reference(problem)
  report["timings"]["reference"] = time.time() - t0
  saved = None
  for shape in MESHES:
    t = time.time()
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=jax.devices()[:8])
    # The next task's boundary (growing subspaces) where the layouts differ most; pure data parallel skips it.
    result = selfcheck.run_sharded(problem, mesh, next_boundary=shape != (8, 1, 1))
    params, state = result["state"][:2]
    sub = clsvd_jax.get_subspaces(state)
    probe_sub = flatten_with_paths(sub, is_leaf=lambda x: isinstance(x, clsvd_jax.Subspace))[PROBE]
    report["meshes"][str(shape)] = {
        "losses": result["losses"], "reference_losses": reference["losses"],
        "compare_errors": selfcheck.compare(result, reference, problem.params, tol=1e-5),
        "layout_errors": result["layout_errors"], "replicated": result["replicated"],
        "boundary_memory": result["boundary_memory"],
        "probe": {"weight": spec_list(flatten_with_paths(params)[PROBE].sharding.spec),
                  "left": spec_list(probe_sub.left.sharding.spec), "right": spec_list(probe_sub.right.sharding.spec),
                  "rank": spec_list(probe_sub.rank.sharding.spec)},
    }
    if shape == (2, 2, 2):
      saved = (params, state)
      checkpoint.save_sharded(ckpt_dir, {"params": params, "opt_state": state})
    report["timings"][str(shape)] = time.time() - t

  # Resume the (2, 2, 2) checkpoint on 4 devices and on 1, and take the next step there.
  t = time.time()
  host_saved = flatten_with_paths(jax.device_get({"params": saved[0], "opt_state": saved[1]}))
  abstract_params = jax.eval_shape(lambda: problem.params)
  abstract_opt = jax.eval_shape(problem.tx.init, problem.params)
  ck = {}
  mesh4 = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  p4 = rules.param_shardings(abstract_params, mesh4)
  o4 = opt_state.opt_state_shardings(abstract_opt, abstract_params, p4)
  one = SingleDeviceSharding(jax.devices()[0])
  for name, p_sh, o_sh in (("4", p4, o4), ("1", one, one)):
    target = {"params": checkpoint.abstract_state(abstract_params, p_sh),
              "opt_state": checkpoint.abstract_state(abstract_opt, o_sh)}
    restored = checkpoint.restore_sharded(ckpt_dir, target)
    errors = []
    for path, x in flatten_with_paths(restored).items():
      want = flatten_with_paths(target)[path].sharding
      if not x.sharding.is_equivalent_to(want, x.ndim):
        errors.append(f"{path}: restored as {x.sharding}, target {want}")
      if not np.array_equal(np.asarray(x), np.asarray(host_saved[path])):
        errors.append(f"{path}: restored values differ from the saved ones")
    if name == "4":
      errors += opt_state.basis_sharding_errors(restored["opt_state"], restored["params"])
      b_sh = rules.batch_shardings(mesh4, problem.resume_batch)
      step = train_step.jit_train_step(problem.step, mesh4, p4, o4, b_sh)
      batch = jax.device_put(problem.resume_batch, b_sh)
    else:
      step = reference["step"]
      batch = problem.resume_batch
    params, _, metrics = step(restored["params"], restored["opt_state"], batch)
    loss = float(metrics["loss"])
    if abs(loss - reference["resume_loss"]) > 1e-5 * abs(reference["resume_loss"]):
      errors.append(f"resumed loss {loss} vs uninterrupted single-device {reference['resume_loss']}")
    ref_p = flatten_with_paths(reference["resume_params"])
    for path, x in flatten_with_paths(jax.device_get(params)).items():
      diff = float(np.max(np.abs(x - ref_p[path])))
      if diff > 1e-5:
        errors.append(f"resumed param {path}: differs by {diff:.2e}")
    ck[name] = {"errors": errors, "devices": len(jax.tree.leaves(restored)[0].sharding.device_set),
                "loss": loss, "reference_loss": reference["resume_loss"]}
  report["checkpoint"] = ck
  report["timings"]["checkpoint"] = time.time() - t
  return report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  assert jax.device_count() >= 8, f"the mesh tests need 8 devices (tests/conftest.py sets them), got {jax.devices()}"
  return _run_meshes(tmp_path_factory.mktemp("meshes") / "ckpt")



def test_sharded_training_on_three_meshes(report):
  meshes = report["meshes"]
  assert set(meshes) == {"(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"}
  for name, r in meshes.items():
    # Same loss and params as one device to 1e-5 after 5 steps, subspaces (and the next boundary's grown ones)
    # equal to the single-device ones, and U U^T dW = dW V V^T = 0 for every constrained matrix.
    assert r["compare_errors"] == [], (name, r["compare_errors"])
    assert len(r["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(r["losses"], r["reference_losses"])) < 1e-5
    # Every basis laid out as its weight says, before and after the steps.
    assert r["layout_errors"] == [], (name, r["layout_errors"])
    # q_proj [L, out, in] is column-parallel: out on tensor, in on fsdp; its left basis [L, out, c] takes the
    # out spec (capacity column on the in spec), the right basis [L, in, c] the in spec; ranks replicated.
    assert r["probe"] == {"weight": [None, "tensor", "fsdp"], "left": [None, "tensor", "fsdp"],
                          "right": [None, "fsdp", "tensor"], "rank": []}, name
  # Where the mesh has model-parallel axes, no array of >= 256 elements is whole on every device.
  for name in ("(2, 2, 2)", "(1, 4, 2)"):
    assert meshes[name]["replicated"] == [], (name, meshes[name]["replicated"])


def test_boundary_memory_is_reported_and_shrinks_with_sharding(report):
  mem = {name: r["boundary_memory"] for name, r in report["meshes"].items()}
  for name, m in mem.items():
    assert m is not None and m["peak"] > 0 and m["argument"] > 0, (name, m)
  # Pure data parallelism replicates the weights; FSDP x tensor splits them, so the boundary needs less per device.
  assert mem["(1, 4, 2)"]["peak"] < mem["(2, 2, 2)"]["peak"] < mem["(8, 1, 1)"]["peak"]


def test_checkpoint_saved_on_8_devices_resumes_on_4_and_1(report):
  ck = report["checkpoint"]
  assert ck["4"]["devices"] == 4 and ck["1"]["devices"] == 1
  for name, r in ck.items():
    # Same values as saved, laid out as the new target asks, and the next step equals the uninterrupted run.
    assert r["errors"] == [], (name, r["errors"])
    assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * abs(r["reference_loss"])
