"""``clsvd compare`` on a tiny config, 2 methods x 2 seeds: one process per run, a killed run resumed, finished runs
read back on a second call, the table's means and spreads against the runs' own results, and the refusals."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from clsvd_jax import cli
from clsvd_jax.train import compare, runner

sys.path.insert(0, str(Path(__file__).parent / "train"))
from _train_helpers import tiny_config_dict  # noqa: E402


def test_compare_two_methods_two_seeds(tmp_path, capsys):
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), training={"steps_per_task": 2})
  d.pop("run_dir")
  config = tmp_path / "tiny.yaml"
  config.write_text(yaml.safe_dump(d))
  out = tmp_path / "cmp"
  args = ["compare", str(config), "--methods", "seqft,lora", "--seeds", "0,1", "--out", str(out)]

  # A run killed in its second task (its checkpoint after task 1 is there): compare must resume it.
  killed = compare.plan(config, ["lora"], [1], out)[0]
  with pytest.raises(runner.RunInterrupted):
    runner.run(compare.run_config(config, killed), echo=None, stop_after_steps=3)
  assert not (killed.run_dir / "results.json").exists()

  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  assert "| seqft | 0,1 |" in printed and "| lora | 0,1 |" in printed
  assert "resumed from" in (out / "logs" / "lora_seed1.log").read_text()

  summary = json.loads((out / compare.SUMMARY).read_text())
  table = (out / compare.TABLE).read_text()
  assert table.splitlines()[0].startswith("| method | seeds | AA | BWT | FWT | forgetting | option rate | rank AA")
  assert (out / compare.PLOT).stat().st_size > 1000
  for method in ("seqft", "lora"):
    runs = [json.loads((out / method / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["config"]["method"] for r in runs] == [method] * 2
    assert [r["config"]["training"]["seed"] for r in runs] == [0, 1]
    assert [r["config"]["model"]["init_seed"] for r in runs] == [0, 1]
    cols = summary["methods"][method]["columns"]
    ranks = [r["rank_metrics"]["AA"] for r in runs]
    assert cols["rank AA"]["mean"] == pytest.approx(np.mean(ranks))
    assert cols["rank AA"]["std"] == pytest.approx(np.std(ranks, ddof=1))
    assert cols["AA"]["mean"] == pytest.approx(np.mean([r["AA"] for r in runs]))
    assert cols["time (s)"]["mean"] == pytest.approx(np.mean([compare.run_seconds(r) for r in runs]))
    assert cols["peak host RSS (GiB)"]["mean"] > 0
    assert np.allclose(summary["methods"][method]["R_mean"], np.mean([r["R"] for r in runs], axis=0))

  # Again: every run is finished, so nothing runs and nothing is rewritten.
  stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/results.json")}
  assert cli.main(args) == 0
  assert capsys.readouterr().out.count("finished before, read back") == 4
  assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/results.json")} == stamps

  # Another config on the same folders is refused before anything runs; so is an unknown method.
  assert cli.main(args + ["--set", "optimizer.lr=0.1"]) == cli.EXIT_BAD_INPUT
  assert "holds a run of another config" in capsys.readouterr().err
  assert cli.main(["compare", str(config), "--methods", "seqft,sgd"]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert "--methods: unknown method 'sgd'" in err and "replay" in err


@pytest.mark.parametrize("n, grid", [(3, (1, 3)), (9, (3, 3))])
def test_r_matrix_plot_wraps_many_methods_into_a_grid(tmp_path, n, grid):
  """Nine methods side by side were a 3040 x 455 strip; past four they wrap into a near-square grid."""
  import matplotlib.image

  rng = np.random.default_rng(0)
  tasks = ["a", "b", "c", "d"]
  methods = {f"m{i}": {"R_mean": rng.uniform(0, 1, (4, 4)).tolist(), "tasks": tasks, "seeds": [0],
                       "columns": {"AA": {"mean": 0.5}}} for i in range(n)}
  path = tmp_path / "R.png"
  assert compare.plot_r_matrices({"methods": methods}, path)
  height, width = matplotlib.image.imread(path).shape[:2]
  rows, cols = grid
  assert 0.6 < (width / height) / (cols / rows) < 1.6, (width, height)  # rows x cols panels of about equal sides
  assert not compare.plot_r_matrices({"methods": {}}, tmp_path / "none.png")
