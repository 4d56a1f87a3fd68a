"""``clsvd compare``: several methods (and seeds) on one task stream, then one comparison table and one plot.

Every (method, seed) pair is a run of its own in ``<out>/<method>/seed_<seed>/`` with the config's other settings
and ``--set`` overrides, ``method: <method>``, ``training.seed`` and ``model.init_seed`` set to the seed. Each run
goes through ``clsvd train`` in a process of its own, so its peak memory is its own (``resources``) and one failed
run does not take the others down; its output goes to ``<out>/logs/<method>_seed<seed>.log``. The processes share
JAX's persistent compilation cache in ``<out>/.jax_cache`` (unless ``JAX_COMPILATION_CACHE_DIR`` is set), so the
seeds of a method, which run the same programs, compile them once (measured on the tiny test config: 8 s of CPU per
run instead of 19 s).

Comparing again is cheap and safe: a finished run (its ``results.json``) is read back, not rerun, once its config
is checked to be the one asked for (a folder that holds another config's run stops the comparison: a run never
silently replaces another); a killed run is resumed from its newest checkpoint (``clsvd train --resume``).

The comparison (``comparison.md``, ``comparison.json`` and ``R_matrices.png`` in ``<out>``) has one row per method:
the mean and the standard deviation over seeds (n - 1 in the denominator) of AA, BWT, FWT, forgetting, the option
rate and rank-classification AA (all in %), the run time (task boundaries + training + evaluation, as results.json
records them: no process start or data preparation) and the peak memory of the run's process (host resident set;
accelerator memory where the backend reports it). The plot shows each method's R matrix (the mean over seeds) side
by side.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clsvd_jax import config as config_lib
from clsvd_jax.config import ConfigError, RunConfig
from clsvd_jax.train import outputs
from clsvd_jax.train.methods import METHODS, get_method

TABLE = "comparison.md"
SUMMARY = "comparison.json"
PLOT = "R_matrices.png"

# Exit statuses of ``clsvd train`` (``cli``) after which the run's results.json is complete.
_FINISHED_EXITS = (0, 4)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a comparison.

  Attributes:
    method: the method.
    seed: ``training.seed`` and ``model.init_seed`` of the run.
    run_dir: where the run writes.
    overrides: the ``--set`` overrides that make the config of this run (the user's, then method and seed).
  """

  method: str
  seed: int
  run_dir: Path
  overrides: tuple[str, ...]

  @property
  def label(self) -> str:
    return f"{self.method} seed {self.seed}"


@dataclasses.dataclass
class RunOutcome:
  """What became of one run: its results, or why there are none.

  Attributes:
    spec: the run.
    results: its results.json (None when it failed).
    status: ``read back`` (finished before), ``ran`` (in this call) or ``failed``.
    error: why it failed (the last lines of its log).
    seconds: wall time of its process in this call (None when it was read back).
  """

  spec: RunSpec
  results: dict[str, Any] | None
  status: str
  error: str | None = None
  seconds: float | None = None


def parse_methods(text: str) -> list[str]:
  """``seqft,osft`` -> the method names, each registered, none twice.

  Raises:
    ConfigError: naming ``--methods`` and the registered methods.
  """
  names = [m.strip() for m in text.split(",") if m.strip()]
  if not names:
    raise ConfigError("--methods: give at least one method, e.g. --methods seqft,osft")
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    raise ConfigError(f"--methods: unknown method {unknown[0]!r}; registered methods: {', '.join(sorted(METHODS))}")
  if len(set(names)) != len(names):
    raise ConfigError(f"--methods: {text!r} names a method twice")
  return names


def parse_seeds(text: str) -> list[int]:
  """``0,1,2`` -> ``[0, 1, 2]``.

  Raises:
    ConfigError: naming ``--seeds``.
  """
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of integers, e.g. --seeds 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ConfigError(f"--seeds: {text!r}: give distinct non-negative integers, e.g. --seeds 0,1,2")
  return seeds


def plan(config_path: str | os.PathLike[str], methods: Sequence[str], seeds: Sequence[int], out: str | os.PathLike[str],
         overrides: Sequence[str] = ()) -> list[RunSpec]:
  """The runs of a comparison, every config validated before anything runs.

  Raises:
    ConfigError: a config (with its overrides) that does not load, naming the method and seed.
  """
  specs = []
  # Seed-major: a comparison stopped part-way has every method at the seeds it finished.
  for seed in seeds:
    for method in methods:
      spec = RunSpec(method, seed, Path(out) / method / f"seed_{seed}",
                     tuple(overrides) + (f"method={method}", f"training.seed={seed}", f"model.init_seed={seed}",
                                         f"name={method}-seed{seed}", "training.progress=false"))
      try:
        run_config(config_path, spec)
      except ConfigError as e:
        raise ConfigError(f"{spec.label}: {e}") from None
      specs.append(spec)
  return specs


def run_config(config_path: str | os.PathLike[str], spec: RunSpec) -> RunConfig:
  """The config of one run (what ``clsvd train`` will read, run_dir included)."""
  cfg = config_lib.load_config(config_path, spec.overrides)
  cfg.run_dir = str(spec.run_dir)
  return cfg


def finished_results(config_path: str | os.PathLike[str], spec: RunSpec) -> dict[str, Any] | None:
  """The results of a finished run of ``spec`` (None when it has not finished).

  Raises:
    ConfigError: ``run_dir`` holds the results of another config.
  """
  from clsvd_jax.train.context import config_hash

  path = spec.run_dir / outputs.RESULTS
  if not path.is_file():
    return None
  results = outputs.read_results(spec.run_dir)
  want = run_config(config_path, spec)
  want = get_method(want.method).resolve_config(want)
  try:
    got = config_lib.from_dict(results.get("config") or {}, str(path))
  except ConfigError:
    got = None
  if got is None or config_hash(got) != config_hash(want):
    raise ConfigError(f"{path} holds a run of another config than {spec.label} of this comparison; give another "
                      "--out, or move that folder away")
  return results


def train_command(config_path: str | os.PathLike[str], spec: RunSpec) -> list[str]:
  """``clsvd train`` of one run, resuming whatever the run directory holds."""
  sets = [a for o in spec.overrides for a in ("--set", o)]
  return [sys.executable, "-m", "clsvd_jax.cli", "train", os.fspath(config_path), *sets, "--run-dir",
          os.fspath(spec.run_dir), "--resume"]


def child_env(out: Path) -> dict[str, str]:
  """The environment of the run processes: this one, plus a compilation cache they share (unless one is set)."""
  env = dict(os.environ)
  if "JAX_COMPILATION_CACHE_DIR" not in env:
    env["JAX_COMPILATION_CACHE_DIR"] = str(Path(out).resolve() / ".jax_cache")
    # Cache every program: on a busy machine even small ones take seconds to compile.
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return env


def execute(config_path: str | os.PathLike[str], spec: RunSpec, log: Path, env: Mapping[str, str] | None = None
            ) -> tuple[int, float]:
  """Runs one ``clsvd train`` process with its output in ``log``; returns its exit status and wall time."""
  log.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with log.open("a", encoding="utf-8") as f:
    f.write(f"$ {' '.join(train_command(config_path, spec))}\n")
    f.flush()
    proc = subprocess.Popen(train_command(config_path, spec), stdout=f, stderr=subprocess.STDOUT,
                            env=dict(env) if env is not None else None)
    try:
      code = proc.wait()
    finally:
      if proc.poll() is None:
        # Interrupted while waiting: the run stops too (a later comparison resumes it).
        proc.terminate()
        proc.wait(timeout=120)
  return code, time.perf_counter() - t0


def _tail(log: Path, lines: int = 6) -> str:
  try:
    text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
  except OSError:
    return "(no log)"
  return " | ".join(text[-lines:])


def run_all(config_path: str | os.PathLike[str], specs: Sequence[RunSpec], out: Path,
            say: Callable[[str], None] = print) -> list[RunOutcome]:
  """Reads back the finished runs and runs (or resumes) the others, one after another."""
  outcomes = []
  for i, spec in enumerate(specs):
    head = f"[{i + 1}/{len(specs)}] {spec.label}"
    results = finished_results(config_path, spec)
    if results is not None:
      say(f"{head}: finished before, read back from {spec.run_dir}")
      outcomes.append(RunOutcome(spec, results, "read back"))
      continue
    log = out / "logs" / f"{spec.method}_seed{spec.seed}.log"
    say(f"{head}: running in {spec.run_dir} (log {log})")
    code, seconds = execute(config_path, spec, log, child_env(out))
    results = finished_results(config_path, spec) if code in _FINISHED_EXITS else None
    if results is None:
      error = f"clsvd train exited with status {code}: {_tail(log)}"
      say(f"{head}: failed after {seconds:.0f} s ({error})")
      outcomes.append(RunOutcome(spec, None, "failed", error=error, seconds=seconds))
      continue
    say(f"{head}: done in {seconds:.0f} s: {outputs.format_summary(results)}")
    outcomes.append(RunOutcome(spec, results, "ran", seconds=seconds))
  return outcomes


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------


def run_seconds(results: Mapping[str, Any]) -> float:
  """Task boundaries + training + evaluation of a run, in seconds (results.json)."""
  return float(sum(results.get(k) or 0.0 for k in ("boundary_seconds", "train_seconds", "eval_seconds")))


# (column, unit) -> the value of one run's results (None when the run has none).
COLUMNS: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
  "AA": lambda r: r.get("AA"),
  "BWT": lambda r: r.get("BWT"),
  "FWT": lambda r: r.get("FWT"),
  "forgetting": lambda r: r.get("forgetting"),
  "option rate": outputs.mean_option_rate,
  "rank AA": lambda r: (r.get("rank_metrics") or {}).get("AA"),
  "time (s)": run_seconds,
  "peak host RSS (GiB)": lambda r: _gib((r.get("peak_memory") or {}).get("host_rss_bytes")),
  "peak device (GiB)": lambda r: _gib((r.get("peak_memory") or {}).get("device_bytes")),
}
_PERCENT = {"AA", "BWT", "FWT", "forgetting", "option rate", "rank AA"}


def _gib(x: Any) -> float | None:
  return None if x is None else float(x) / 2**30


def mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
  """Mean, sample standard deviation (None for one value) and count of the values that are there."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not v.size:
    return None, None, 0
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def summarize(outcomes: Sequence[RunOutcome]) -> dict[str, Any]:
  """Per method: the seeds that finished, every column's mean / spread, and the mean R (comparison.json)."""
  methods: dict[str, Any] = {}
  for o in outcomes:
    m = methods.setdefault(o.spec.method, {"seeds": [], "failed": [], "runs": {}})
    if o.results is None:
      m["failed"].append({"seed": o.spec.seed, "error": o.error})
      continue
    m["seeds"].append(o.spec.seed)
    m["runs"][str(o.spec.seed)] = {"run_dir": str(o.spec.run_dir), "status": o.status, "process_seconds": o.seconds}
  for method, m in methods.items():
    done = [o.results for o in outcomes if o.spec.method == method and o.results is not None]
    m["columns"] = {}
    for col, get in COLUMNS.items():
      mean, spread, n = mean_spread([get(r) for r in done])
      m["columns"][col] = {"mean": mean, "std": spread, "n": n}
    if done:
      m["R_mean"] = np.mean([np.asarray(r["R"], np.float64) for r in done], axis=0).tolist()
      m["tasks"], m["row_names"] = done[0]["tasks"], done[0].get("row_names")
  return {"methods": methods}


def _cell(col: str, entry: Mapping[str, Any]) -> str:
  mean, spread = entry["mean"], entry["std"]
  if mean is None:
    return "-"
  scale, digits = (100.0, 1) if col in _PERCENT else (1.0, 0 if col == "time (s)" else 2)
  text = f"{scale * mean:.{digits}f}"
  return text + (f" ± {scale * spread:.{digits}f}" if spread is not None else "")


def format_table(summary: Mapping[str, Any], *, config_path: str | os.PathLike[str] | None = None) -> str:
  """The markdown table of a comparison, with the notes that say how to read it."""
  methods = summary["methods"]
  cols = [c for c in COLUMNS if any(m["columns"][c]["mean"] is not None for m in methods.values())]
  lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
  for name, m in methods.items():
    seeds = ",".join(str(s) for s in m["seeds"]) or "-"
    lines.append(f"| {name} | {seeds} | " + " | ".join(_cell(c, m["columns"][c]) for c in cols) + " |")
  notes = ["", "Mean ± standard deviation over seeds (n - 1); accuracies, transfer and rates in %. "
           "AA, BWT, FWT, forgetting: exact match; option rate: share of answers that are one of the task's labels "
           "(last row); rank AA: rank classification (the likeliest label option). time: task boundaries + training "
           "+ evaluation of one run, as results.json records them. Peak memory: high-water mark of the run's "
           "process."]
  if config_path is not None:
    notes.append(f"Config: {config_path}.")
  failed = [(name, f) for name, m in methods.items() for f in m["failed"]]
  for name, f in failed:
    notes.append(f"FAILED: {name} seed {f['seed']}: {f['error']}")
  return "\n".join(lines + notes) + "\n"


def plot_r_matrices(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> bool:
  """One heatmap per method (R averaged over seeds) side by side; False (no file) when no run finished."""
  methods = {k: m for k, m in summary["methods"].items() if m.get("R_mean") is not None}
  if not methods:
    return False
  plt = outputs.pyplot()
  n = len(methods)
  tasks = next(iter(methods.values()))["tasks"]
  # One row up to four methods, then a near-square grid (nine methods: 3 x 3), so the figure stays readable.
  ncols = n if n <= 4 else math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  # Room above each plot for the two-line title, beside it for the row labels.
  height = 0.6 + (1.6 + 0.5 * len(tasks)) * nrows
  fig, axes = plt.subplots(nrows, ncols, figsize=(0.6 + (1.6 + 0.55 * len(tasks)) * ncols, height), squeeze=False,
                           gridspec_kw={"wspace": 0.6, "hspace": 0.7, "top": 1 - 1.0 / height})
  flat = axes.ravel().tolist()
  im = None
  for ax, (name, m) in zip(flat, methods.items()):
    r = np.asarray(m["R_mean"], np.float64) * 100
    im = ax.imshow(r, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(r.shape[0]):
      for j in range(r.shape[1]):
        ax.text(j, i, f"{r[i, j]:.0f}", ha="center", va="center", color="w" if r[i, j] < 60 else "k", fontsize=7)
    aa = m["columns"]["AA"]["mean"]
    ax.set_title(f"{name} (n={len(m['seeds'])})\nAA {100 * aa:.1f}", fontsize=9)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
    rows = m.get("row_names") or tasks
    ax.set_yticks(range(r.shape[0]), [str(x)[:12] for x in rows[:r.shape[0]]], fontsize=7)
  for ax in flat[n:]:
    ax.set_visible(False)
  fig.colorbar(im, ax=flat[:n], fraction=0.02)
  fig.suptitle("R (exact-match accuracy %, row = after training that task; mean over seeds)", fontsize=9, y=0.98)
  outputs.save_figure(fig, path)
  plt.close(fig)
  return True


def compare(config_path: str | os.PathLike[str], methods: Sequence[str], seeds: Sequence[int],
            out: str | os.PathLike[str], overrides: Sequence[str] = (), say: Callable[[str], None] = print
            ) -> tuple[dict[str, Any], list[RunOutcome]]:
  """Runs the comparison (see the module docstring) and writes its table, summary and plot into ``out``.

  Returns:
    The summary (comparison.json) and the outcome of every run.

  Raises:
    ConfigError: a config that does not load, or a run directory that holds another config's run.
  """
  out = Path(out)
  specs = plan(config_path, methods, seeds, out, overrides)
  outcomes = run_all(config_path, specs, out, say=say)
  summary = summarize(outcomes) | {"config": os.fspath(config_path), "overrides": list(overrides),
                                   "seeds": list(seeds)}
  out.mkdir(parents=True, exist_ok=True)
  table = format_table(summary, config_path=config_path)
  outputs.write_text_atomic(out / TABLE, table)
  outputs.write_json(out / SUMMARY, summary)
  plotted = plot_r_matrices(summary, out / PLOT)
  say(table)
  say(f"comparison in {out / TABLE}, {out / SUMMARY}" + (f" and {out / PLOT}" if plotted else ""))
  return summary, outcomes
