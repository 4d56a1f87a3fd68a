"""What a run leaves in its directory: ``results.json``, ``R.csv``, PNG plots, and the tables ``clsvd inspect`` prints.

Plots (matplotlib, Agg backend, no display needed):
  * ``R_heatmap.png``: the accuracy matrix, row i = after training task i;
  * ``task_curves.png``: accuracy of every task across the stream (the point "before" is the untrained model);
  * ``protected_ranks.png``: protected fraction of each layer before each task, one panel per stack of blocks.

Predictions: ``predictions/initial.jsonl`` (the model before training, when evaluated) and
``predictions/after_<row>.jsonl`` for every row of R (``<row>`` the task trained, or ``a+b+...`` for ``mtl``), one
JSON line per example of every task (``task``, ``id``, ``prediction``, ``label``, ``correct``, ``in_options``),
written atomically when the evaluation ends and listed in ``results.json`` (``predictions``).

Every file goes through ``run_path`` (``etils.epath``), so ``run_dir`` may be a local folder or a URL such as
``gs://bucket/run`` (a pod's hosts share a bucket; ``pip install clsvd_jax[gcs]`` installs gcsfs, which epath
uses for ``gs://`` when TensorFlow is absent). Files are written whole, from memory: matplotlib and ``csv`` cannot
write to a URL themselves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

RESULTS = "results.json"
R_CSV = "R.csv"
PLOTS = ("R_heatmap.png", "task_curves.png", "protected_ranks.png")
PREDICTIONS = "predictions"


class RunPathError(ValueError):
  """A run directory given as a URL whose scheme no file system here can read."""


def run_path(path: str | os.PathLike[str]) -> epath.Path:
  """``path`` as an ``epath.Path``: local paths behave as ``pathlib``; ``gs://``, ``s3://``... go to a bucket.

  Raises:
    RunPathError: for a URL scheme epath does not know (``pathlib`` would silently make it a local folder).
  """
  try:
    return epath.Path(path)
  except KeyError:
    raise RunPathError(f"{os.fspath(path)!r}: unsupported URL scheme (use a local path or gs://, s3://, az://, "
                     "hf://)") from None


def is_local(path: str | os.PathLike[str]) -> bool:
  """False for a URL (``gs://...``): an object store, with no real folders and no atomic rename."""
  return "://" not in os.fspath(path)


def make_dirs(path: str | os.PathLike[str]) -> None:
  """``mkdir -p`` for a local folder; nothing for a URL (an object's name makes its prefix, and gcsfs would try to
  create a missing bucket)."""
  if is_local(path):
    run_path(path).mkdir(parents=True, exist_ok=True)


def _json_default(x: Any) -> Any:
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  """Writes a text file atomically (a reader never sees half a file)."""
  path = run_path(path)
  if not is_local(path):
    # An object appears only once its upload is complete, so a direct write is already all-or-nothing.
    path.write_text(text, encoding="utf-8")
    return
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  write_text_atomic(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def prediction_file(row: str | None) -> str:
  """The predictions file of an evaluation, relative to the run directory: ``row`` None is the model before
  training (``predictions/initial.jsonl``), else ``predictions/after_<row>.jsonl``."""
  if row is None:
    return f"{PREDICTIONS}/initial.jsonl"
  safe = "".join(ch if ch.isalnum() or ch in "._+-" else "_" for ch in row)
  return f"{PREDICTIONS}/after_{safe}.jsonl"


def write_predictions(run_dir: str | os.PathLike[str], row: str | None,
                      records: Sequence[Mapping[str, Any]]) -> str:
  """Writes one evaluation's per-example records as JSON lines (atomically); returns the file's relative path."""
  rel = prediction_file(row)
  make_dirs(run_path(run_dir) / PREDICTIONS)
  text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
  write_text_atomic(run_path(run_dir) / rel, text)
  return rel


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a predictions file."""
  return [json.loads(line) for line in run_path(path).read_text(encoding="utf-8").splitlines() if line]


def read_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads ``results.json`` of a finished run.

  Raises:
    FileNotFoundError: naming the file, when the run has none (not finished, or not a run directory).
  """
  path = run_path(run_dir) / RESULTS
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished run directory (results.json is written "
                            "when the last task has been evaluated)")
  return json.loads(path.read_text(encoding="utf-8"))


def write_r_csv(path: str | os.PathLike[str], tasks: Sequence[str], r: Sequence[Sequence[float]],
                row_names: Sequence[str] | None = None) -> None:
  """``R.csv``: a header ``after,<task>...`` and one row per trained stage."""
  row_names = row_names or [f"after_{t}" for t in tasks[:len(r)]]
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(["after", *tasks])
  for name, row in zip(row_names, r):
    w.writerow([name, *(f"{x:.6f}" for x in row)])
  run_path(path).write_bytes(buf.getvalue().encode("utf-8"))


def read_r_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[list[float]]]:
  """The task names and the rows of an ``R.csv``."""
  text = run_path(path).read_bytes().decode("utf-8")
  rows = list(csv.reader(io.StringIO(text, newline="")))
  return rows[0][1:], [[float(x) for x in row[1:]] for row in rows[1:]]


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 1) -> str:
  if x is None:
    return "-"
  return f"{100 * x:.{digits}f}"


def mean_option_rate(results: Mapping[str, Any]) -> float | None:
  """The mean option rate of the last row (over tasks that have labels); None when there is none."""
  rates = results.get("option_rate")
  last = [x for x in (rates[-1] if rates else []) if x is not None]
  return float(np.mean(last)) if last else None


def format_r_table(results: Mapping[str, Any], title: str | None = None) -> str:
  """The accuracy matrix (in %) with a row per stage, plus the initial model when evaluated."""
  tasks = list(results["tasks"])
  width = max(8, *(len(t) + 1 for t in tasks))
  rows = []
  head = "after".ljust(12) + "".join(t.rjust(width) for t in tasks)
  if title:
    rows.append(title)
  rows.append(head)
  if results.get("R_initial") is not None:
    rows.append("(initial)".ljust(12) + "".join(_fmt(x).rjust(width) for x in results["R_initial"]))
  names = results.get("row_names") or tasks
  for name, row in zip(names, results["R"]):
    rows.append(str(name)[:11].ljust(12) + "".join(_fmt(x).rjust(width) for x in row))
  return "\n".join(rows)


def format_option_table(results: Mapping[str, Any], title: str | None = None) -> str | None:
  """The option rate (%, share of answers that are one of the task's labels) laid out like R; None when the
  results have none (an older run)."""
  rates = results.get("option_rate")
  if not rates:
    return None
  table = {"tasks": results["tasks"], "row_names": results.get("row_names"), "R": rates,
           "R_initial": results.get("option_rate_initial")}
  return format_r_table(table, title=title)


def format_rank_table(results: Mapping[str, Any], title: str | None = None) -> str | None:
  """The rank-classification accuracy (%) laid out like R, then its AA / BWT / FWT / forgetting; None when the
  results have none (rank classification off, no task with labels, or an older run)."""
  r = results.get("R_rank")
  if not r or all(x is None for row in r for x in row):
    return None
  table = {"tasks": results["tasks"], "row_names": results.get("row_names"), "R": r,
           "R_initial": results.get("R_rank_initial")}
  m = results.get("rank_metrics") or {}
  line = "  ".join(f"{k}={_fmt(m.get(k))}" for k in ("AA", "BWT", "FWT", "forgetting"))
  return format_r_table(table, title=title) + "\nrank classification: " + line


SUMMARY_KEYS = ("AA", "BWT", "FWT", "forgetting", "pooled_accuracy")


def format_summary(results: Mapping[str, Any]) -> str:
  """One line of the headline metrics (in %) and the invariant."""
  parts = [f"{k}={_fmt(results.get(k))}" for k in SUMMARY_KEYS]
  if mean_option_rate(results) is not None:
    parts.append(f"option_rate={_fmt(mean_option_rate(results))}")
  rank_aa = (results.get("rank_metrics") or {}).get("AA")
  if rank_aa is not None:
    parts.append(f"rank_AA={_fmt(rank_aa)}")
  inv = results.get("invariant_max")
  if inv is not None:
    parts.append(f"invariant_max={inv:.2e}")
  return "  ".join(parts)


def format_side_by_side(runs: Mapping[str, Mapping[str, Any]]) -> str:
  """R matrices of several runs one after another, then a metric table with one column per run."""
  blocks = [format_r_table(res, title=f"[{name}] R (accuracy %, row = after training that task)")
            for name, res in runs.items()]
  names = list(runs)
  width = max(10, *(len(n) + 2 for n in names))
  lines = ["metric".ljust(16) + "".join(n.rjust(width) for n in names)]
  for key in SUMMARY_KEYS:
    lines.append(key.ljust(16) + "".join(_fmt(runs[n].get(key)).rjust(width) for n in names))
  if any(mean_option_rate(runs[n]) is not None for n in names):
    lines.append("option_rate".ljust(16) + "".join(_fmt(mean_option_rate(runs[n])).rjust(width) for n in names))
  lines.append("invariant_max".ljust(16) + "".join(
    (f"{runs[n]['invariant_max']:.1e}" if runs[n].get("invariant_max") is not None else "-").rjust(width)
    for n in names))
  return "\n\n".join(blocks + ["\n".join(lines)])


def format_ranks(results: Mapping[str, Any], max_rows: int = 40) -> str:
  """Mean protected fraction per matrix before each task (from the scheduler's records)."""
  records = [r for r in results.get("scheduler", {}).get("records", []) if r.get("rank_ratio")]
  if not records:
    return "(no protected subspaces: the method constrains nothing)"
  paths = list(records[0]["rank_ratio"])
  tasks = list(results["tasks"])
  width = 9
  lines = ["matrix".ljust(48) + "".join(f"t{r['task'] + 1}".rjust(width) for r in records)]
  for path in paths[:max_rows]:
    vals = [np.mean(r["rank_ratio"][path]) for r in records]
    lines.append(path[-47:].ljust(48) + "".join(f"{v:.2f}".rjust(width) for v in vals))
  if len(paths) > max_rows:
    lines.append(f"... {len(paths) - max_rows} more matrices")
  lines.append("(protected fraction of min(m, n) before each task; tasks: " + ", ".join(tasks) + ")")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
  """``fig.savefig`` into memory, then one write (savefig cannot write to a URL)."""
  path = run_path(path)
  buf = io.BytesIO()
  # bbox_inches="tight": rotated tick labels and a suptitle are kept inside the image, not cut at its edge.
  fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
  path.write_bytes(buf.getvalue())


def plot_r_heatmap(results: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
  plt = pyplot()
  r = np.asarray(results["R"], np.float64) * 100
  tasks = list(results["tasks"])
  names = results.get("row_names") or tasks
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.6 * len(r)))
  im = ax.imshow(r, vmin=0, vmax=100, cmap="viridis", aspect="auto")
  for i in range(r.shape[0]):
    for j in range(r.shape[1]):
      ax.text(j, i, f"{r[i, j]:.0f}", ha="center", va="center", color="w" if r[i, j] < 60 else "k", fontsize=8)
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(range(len(r)), [f"after {n}" for n in names[:len(r)]])
  ax.set_xlabel("evaluated task")
  ax.set_title(f"{results.get('method', '')} accuracy (%)")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def plot_task_curves(results: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
  plt = pyplot()
  r = np.asarray(results["R"], np.float64) * 100
  tasks = list(results["tasks"])
  names = list(results.get("row_names") or tasks)[:len(r)]
  x_labels = names
  if results.get("R_initial") is not None:
    r = np.vstack([np.asarray(results["R_initial"], np.float64) * 100, r])
    x_labels = ["init"] + names
  fig, ax = plt.subplots(figsize=(1.5 + 1.0 * len(x_labels), 3.2))
  for j, task in enumerate(tasks):
    ax.plot(range(len(r)), r[:, j], marker="o", label=task)
  ax.set_xticks(range(len(r)), x_labels, rotation=30, ha="right")
  ax.set_xlabel("after training")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(-3, 103)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(f"{results.get('method', '')}: per-task accuracy")
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def rank_maps(results: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{stack: [tasks, layers]}`` mean protected fraction over the matrices of each stack of blocks."""
  records = [r for r in results.get("scheduler", {}).get("records", []) if r.get("rank_ratio")]
  maps: dict[str, list[np.ndarray]] = {}
  for rec in records:
    per_stack: dict[str, list[np.ndarray]] = {}
    for path, ratio in rec["rank_ratio"].items():
      stack = path.rsplit("/layers/", 1)[0] + "/layers" if "/layers/" in path else (
        "layers" if path.startswith("layers/") else path)
      per_stack.setdefault(stack, []).append(np.atleast_1d(np.asarray(ratio, np.float64)))
    for stack, vals in per_stack.items():
      maps.setdefault(stack, []).append(np.mean(np.stack(vals), 0))
  return {k: np.stack(v) for k, v in maps.items()}


def plot_rank_map(results: Mapping[str, Any], path: str | os.PathLike[str]) -> bool:
  """Writes the protected-rank map; returns False (no file) when nothing was protected."""
  maps = rank_maps(results)
  if not maps:
    return False
  plt = pyplot()
  tasks = list(results["tasks"])
  n = len(maps)
  fig, axes = plt.subplots(1, n, figsize=(1.5 + 3.2 * n, 0.9 + 0.45 * len(tasks)), squeeze=False)
  for ax, (stack, m) in zip(axes[0], maps.items()):
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_title(stack, fontsize=9)
    ax.set_xlabel("layer")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]), [f"before {tasks[i]}" if i < len(tasks) else str(i) for i in range(m.shape[0])],
                  fontsize=7)
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if m[i, j] < 0.6 else "k")
  fig.colorbar(im, ax=axes[0].tolist(), fraction=0.046)
  fig.suptitle("protected fraction of min(m, n) (mean over the block's matrices)", fontsize=9)
  save_figure(fig, path)
  plt.close(fig)
  return True


def write_plots(results: Mapping[str, Any], run_dir: str | os.PathLike[str]) -> list[epath.Path]:
  """Writes every plot of the module docstring that applies; returns the files written."""
  run_dir = run_path(run_dir)
  out = []
  plot_r_heatmap(results, run_dir / PLOTS[0])
  out.append(run_dir / PLOTS[0])
  plot_task_curves(results, run_dir / PLOTS[1])
  out.append(run_dir / PLOTS[1])
  if plot_rank_map(results, run_dir / PLOTS[2]):
    out.append(run_dir / PLOTS[2])
  return out


def write_outputs(results: Mapping[str, Any], run_dir: str | os.PathLike[str]) -> list[epath.Path]:
  """``results.json``, ``R.csv`` and the plots."""
  run_dir = run_path(run_dir)
  make_dirs(run_dir)
  write_json(run_dir / RESULTS, results)
  write_r_csv(run_dir / R_CSV, results["tasks"], results["R"], results.get("row_names"))
  return [run_dir / RESULTS, run_dir / R_CSV, *write_plots(results, run_dir)]


def finite_or_none(x: Any) -> float | None:
  """A float for JSON (None for NaN / missing)."""
  if x is None:
    return None
  x = float(x)
  return None if math.isnan(x) else x
