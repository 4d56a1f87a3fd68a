"""``osft.solver``: the runner's boundaries go through the randomized solver (``compute_subspaces(solver=...)``) and
keep the invariant; a mesh run refuses it; a bad value is a config error."""

import json

import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax._src import randomized
from clsvd_jax.train import runner


def test_randomized_boundaries_keep_the_invariant(tmp_path, monkeypatch):
  calls = []
  real = randomized.accumulate
  monkeypatch.setattr(randomized, "accumulate", lambda *a, **k: calls.append(1) or real(*a, **k))
  d = tiny_config_dict(tmp_path, osft={"solver": "randomized"})
  result = json.loads(json.dumps(runner.run(C.from_dict(d), echo=None)))
  assert calls  # the boundaries went through the randomized solver
  assert result["config"]["osft"]["solver"] == "randomized"
  # ranks: one {matrix: [rank per layer]} per task; something is protected
  assert any(max(r) > 0 for task in result["ranks"] for r in task.values())
  assert result["invariant_max"] <= 1e-5


def test_a_mesh_run_refuses_the_randomized_solver(tmp_path):
  d = tiny_config_dict(tmp_path, osft={"solver": "randomized"}, mesh={"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(C.ConfigError, match=r"osft.solver: 'randomized' runs on one device.*osft.solver: exact"):
    runner.run(C.from_dict(d), echo=None)


def test_an_unknown_solver_is_a_config_error(tmp_path):
  d = tiny_config_dict(tmp_path, osft={"solver": "fast"})
  with pytest.raises(C.ConfigError, match=r"osft.solver.*exact.*randomized"):
    C.from_dict(d)
