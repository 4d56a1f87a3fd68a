"""``osft.solver``: the runner's boundaries with the randomized solver (``compute_subspaces(solver=...)``) keep the
invariant and the ranks the exact solver gets; a mesh run refuses it; a bad value is a config error."""

import json

import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.train import runner


def test_randomized_boundaries_keep_the_invariant_and_the_ranks(tmp_path):
  results = {}
  for solver in ("exact", "randomized"):
    d = tiny_config_dict(tmp_path, osft={"solver": solver}, run_dir=str(tmp_path / solver))
    results[solver] = json.loads(json.dumps(runner.run(C.from_dict(d), echo=None)))
  exact, rand = results["exact"], results["randomized"]
  assert rand["config"]["osft"]["solver"] == "randomized"
  # ranks: one {matrix: [rank per layer]} per task; the policy decides them, whatever the solver
  assert rand["ranks"] == exact["ranks"] and any(max(r) > 0 for task in rand["ranks"] for r in task.values())
  assert rand["invariant_max"] <= 1e-5


def test_a_mesh_run_refuses_the_randomized_solver(tmp_path):
  d = tiny_config_dict(tmp_path, osft={"solver": "randomized"}, mesh={"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(C.ConfigError, match=r"osft.solver: 'randomized' runs on one device.*osft.solver: exact"):
    runner.run(C.from_dict(d), echo=None)


def test_an_unknown_solver_is_a_config_error(tmp_path):
  d = tiny_config_dict(tmp_path, osft={"solver": "fast"})
  with pytest.raises(C.ConfigError, match=r"osft.solver.*exact.*randomized"):
    C.from_dict(d)
