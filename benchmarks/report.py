"""``make bench``: runs every benchmark and prints one markdown table of the headline figures against their targets.

Each benchmark runs in its own process (``peers.py``, ``overhead.py``, ``precision.py``, ``boundary.py``, in that
order; ``runner_overhead.py`` too when present) and prints JSON lines, which are kept under ``--out``
(``runs/bench/<name>.jsonl``) next to the table (``runs/bench/table.md``). ``--quick`` runs every benchmark at its toy
size (a smoke test of the whole chain, minutes); the full run takes hours on a 2-core CPU (peers.py's 50 steps of a
LLaMA at batch 16 x 256, boundary.py's exact decompositions of 11008 x 4096 matrices). ``--args NAME=ARGS`` runs
one benchmark with other arguments (e.g. ``--args boundary=--no-exact`` where the exact LLaMA-2-7B decompositions
would take too long); the table's header names every replacement.

The table's rows: per protected fraction, our step ratio, memory and leak against PEFT OSF's and the targets
(step <= 1.10x, memory below PEFT's at 10% / 50% and within plain + 1x at 90%, leak <= 1e-5); the optimizer-only
overhead of ``overhead.py``; the boundary against an epoch of cpu_small and the LLaMA-2-7B boundary against a task
on the same hardware (target <= 5%); the projection leak at each precision scheme (target <= 1e-5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

QUICK_ARGS = {
    "peers": ["--quick", "--json"],
    "overhead": ["--d", "32", "--layers", "2", "--tokens", "256", "--repeats", "3"],
    "precision": ["--d", "32", "--layers", "2", "--tokens", "256", "--steps", "5", "--repeats", "2", "--json"],
    "boundary": ["--quick"],
    "runner_overhead": ["--models", "demo", "--steps", "10", "--repeats", "2"],
}
FULL_ARGS = {"peers": ["--json"], "overhead": [], "precision": ["--json"], "boundary": [], "runner_overhead": []}


def run(name: str, args: list[str], out_dir: Path) -> list[dict[str, Any]]:
  """Runs ``benchmarks/<name>.py`` and returns its JSON lines (also written to ``out_dir/<name>.jsonl``)."""
  print(f"[bench] {name} {' '.join(args)}", file=sys.stderr, flush=True)
  proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], capture_output=True, text=True)
  sys.stderr.write(proc.stderr[-2000:])
  if proc.returncode != 0:
    raise SystemExit(f"[bench] {name} failed (exit {proc.returncode})")
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return rows


def _ok(value: bool | None) -> str:
  return "-" if value is None else ("yes" if value else "**no**")


def table(results: dict[str, list[dict[str, Any]]]) -> str:
  """The headline figures of every benchmark that ran, one markdown table."""
  lines = ["| benchmark | setting | ours | peer / reference | target | met |", "|---|---|---|---|---|---|"]
  add = lambda *cells: lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  peers = results.get("peers", [])
  mine = {r["protected"]: r for r in peers if r["framework"] == "jax" and "step_ratio" in r}
  theirs = {r["protected"]: r for r in peers if r["framework"] == "torch" and "step_ratio" in r}
  plain = next((r for r in peers if r["framework"] == "jax" and "step_ratio" not in r), None)
  for f, r in sorted(mine.items()):
    p = theirs.get(f)
    q1, q3 = r["step_ratio_q1_q3"]
    peer = lambda key, fmt, p=p: format(p[key], fmt) if p else "-"
    add("peers", f"step ratio, {f:.0%} protected", f"{r['step_ratio']:.2f} [{q1:.2f}, {q3:.2f}]",
        f"PEFT OSF {peer('step_ratio', '.2f')}", "<= 1.10", _ok(r["step_ratio"] <= 1.10))
    if f < 0.9 or plain is None:
      target, met = "< PEFT", (r["memory_ratio"] < p["memory_ratio"]) if p else None
    else:
      target, met = f"<= plain + 1 = {plain['memory_ratio'] + 1:.2f}", r["memory_ratio"] <= plain["memory_ratio"] + 1
    add("peers", f"memory / targeted, {f:.0%}", f"{r['memory_ratio']:.2f}", f"PEFT OSF {peer('memory_ratio', '.2f')}",
        target, _ok(met))
    add("peers", f"leak after {r['steps']} steps, {f:.0%}", f"{r['leak']:.1e}", f"PEFT OSF {peer('leak', '.1e')}",
        "<= 1e-5", _ok(r["leak"] <= 1e-5))
    add("peers", f"protection setup s, {f:.0%}", f"{r['setup_s']:.2f} (warm {r['setup_warm_s']:.2f})",
        f"PEFT OSF {peer('setup_s', '.2f')}", "-", "-")
  for r in results.get("overhead", []):
    q1, q3 = r["step_ratio_q1_q3"]
    add("overhead", f"optimizer-only step ratio, {r['protected']:.0%}", f"{r['step_ratio']:.2f} [{q1:.2f}, {q3:.2f}]",
        f"state / params {r['state_ratio']:.2f}", "-", "-")
  for r in results.get("runner_overhead", []):
    q1, q3 = r["ratio_iqr"]
    add("runner_overhead", f"runner / bare loop steps/s, {r['model']}", f"{r['ratio']:.3f} [{q1:.3f}, {q3:.3f}]",
        f"bare {r['bare_steps_per_s']} steps/s", ">= 0.97", _ok(r["ratio"] >= 0.97))
  for r in results.get("boundary", []):
    if r["part"] == "cpu_small":
      add("boundary", f"cpu_small boundary / epoch ({r['solver']})", f"{r['boundary_warm_over_epoch']:.3f}",
          f"first (compiling) {r['boundary_cold_over_epoch']:.2f}", "-", "-")
    elif r["part"] == "llama7b_total":
      # CPU seconds against the task's FLOPs at the GEMM rate per CPU second: the same hardware for both.
      for label in ("exact", "fallback_qr", "randomized_0.1"):
        if f"boundary_{label}_cpu_s" in r:
          boundary, task = r[f"boundary_{label}_cpu_s"], r["task_cpu_s_agnews"]
          add("boundary", f"LLaMA-2-7B boundary / task (agnews), {label} solver", f"{boundary / task:.3%}",
              f"{boundary:.0f} CPU s vs {task:.0f} CPU s", "<= 5%", _ok(boundary / task <= 0.05))
  for r in results.get("precision", []):
    if r["protected"] == 0.5:
      add("precision", f"leak, {r['scheme']}", f"{r['leak']:.1e}", f"one projection {r['single']:.1e}", "<= 1e-5",
          _ok(r["leak"] <= 1e-5))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="every benchmark at its toy size")
  ap.add_argument("--only", nargs="+", default=None, help="run only these benchmarks (names without .py)")
  ap.add_argument("--out", type=Path, default=Path("runs/bench"))
  ap.add_argument("--args", dest="extra", action="append", default=[], metavar="NAME=ARGS",
                  help="replace one benchmark's arguments, e.g. --args 'boundary=--no-exact' (repeatable)")
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  plan = dict(QUICK_ARGS if args.quick else FULL_ARGS)
  for item in args.extra:
    name, sep, rest = item.partition("=")
    if not sep or name not in plan:
      ap.error(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(plan)}")
    plan[name] = shlex.split(rest)
  results = {}
  for name, extra in plan.items():
    if (args.only and name not in args.only) or not (HERE / f"{name}.py").exists():
      continue
    results[name] = run(name, extra, args.out)
  changed = "".join(f"; {name}.py {' '.join(plan[name])}" for name in dict.fromkeys(
      i.partition("=")[0] for i in args.extra))
  header = (f"Measured {datetime.date.today().isoformat()} on {platform.machine()} {platform.processor() or ''} "
            f"({platform.system()}, {_cores()} cores){' --quick' if args.quick else ''}{changed}")
  text = header + "\n\n" + table(results)
  (args.out / "table.md").write_text(text + "\n")
  print(text, flush=True)
  return text


def _cores() -> int:
  import os

  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
  main()
