"""The demo's claim on a shortened stream: with the demo's model and settings, osft keeps the first task while
learning the second, and sequential fine-tuning forgets it (the full demo's figures are in the README)."""

import copy

from clsvd_jax import config as C
from clsvd_jax.train import demo, runner


def test_osft_forgets_visibly_less_than_seqft(tmp_path):
  results = {}
  for method in ("seqft", "osft"):
    d = copy.deepcopy(demo.DEMO_CONFIG)
    d["tasks"] = [dict(t, max_eval=40) for t in d["tasks"][:2]]
    d.update(method=method, run_dir=str(tmp_path / method), data_dir=str(tmp_path))
    d["eval"]["initial"] = False
    d["training"]["progress"] = False
    results[method] = runner.run(C.from_dict(d), echo=None)
  seqft, osft = results["seqft"], results["osft"]
  # Both learn each task when it is trained; only osft still answers task 1 after task 2.
  for r in (seqft, osft):
    assert r["R"][0][0] >= 0.9 and r["R"][1][1] >= 0.9, r["R"]
  assert osft["BWT"] >= -0.2 and seqft["BWT"] <= -0.5, (osft["R"], seqft["R"])
  assert osft["invariant_max"] <= 1e-4
