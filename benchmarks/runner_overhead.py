"""Steady-state speed of the runner's training loop against a bare jitted loop of the same step.

Both loops call the same compiled train step (``clsvd_jax.train.step.TrainStep``) on the same batches:

* runner: ``clsvd_jax.train.phases.train_task.train_task``, the loop ``clsvd train`` runs. Per step it collates the
  next batch (``BatchIterator``), copies it to the device, dispatches the step and keeps its metrics on the device;
  every ``log_every`` steps one fetch brings them to the host (loss sums, token counts, TensorBoard, the
  non-finite check); at the start of the task it reads the parameter norm once (the divergence check).
* bare: the batches collated beforehand, then ``device_put`` + step per batch, and one wait at the end.

Models (the synthetic stream, offline): ``demo`` (the demo's T5: d_model 64, 2+1 layers, batch 32) and
``cpu_small`` (``configs/cpu_small.yaml``'s T5 and batch size: d_model 128, d_ff 256, 2+1 layers, batch 8), both
``osft`` as their configs say (rank-0 bases: the boundary is not part of this measure).

The two loops alternate (runner, bare, runner, bare, ...) after one warm-up of each (which compiles every batch
shape); each repeat times ``--steps`` steps. Prints one JSON line per model: steps per second of each loop (median
over repeats), ``ratio`` = runner steps/s over bare steps/s (median of the paired per-repeat ratios) and its
interquartile range. Target: ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from clsvd_jax import config as config_lib
from clsvd_jax.data.batching import Position
from clsvd_jax.train import demo
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.context import build_context
from clsvd_jax.train.phases.prepare import prepare
from clsvd_jax.train.phases.train_task import train_iterator, train_task
from clsvd_jax.train.run_state import RunState

REPO = Path(__file__).resolve().parents[1]


def model_config(name: str) -> tuple[dict[str, Any], int]:
  """``(model section, batch size)`` of the demo or of ``configs/cpu_small.yaml``."""
  if name == "demo":
    return copy.deepcopy(demo.DEMO_CONFIG["model"]), demo.DEMO_CONFIG["training"]["batch_size"]
  cfg = yaml.safe_load((REPO / "configs" / "cpu_small.yaml").read_text())
  return cfg["model"], cfg["training"]["batch_size"]


def setup(name: str, steps: int, log_every: int, tmp: Path) -> tuple[Any, Any]:
  """The runner's context and fresh arrays for ``name`` on one synthetic task of ``steps`` steps."""
  model, batch_size = model_config(name)
  d = {
    "model": model,
    "tasks": [{"name": "low", "source": "synthetic", "path": str(tmp / "data"), "max_eval": 8}],
    "method": "osft",
    "optimizer": {"lr": 1e-3, "clip_norm": 1.0},
    "training": {"steps_per_task": steps, "batch_size": batch_size, "max_length": 128, "max_target_length": 8,
                 "progress": False, "log_every": log_every},
    "run_dir": str(tmp / f"run_{name}"),
  }
  config = config_lib.from_dict(d, "runner_overhead")
  Path(config.run_dir).mkdir(parents=True, exist_ok=True)
  return build_context(config, prepare(config), run_dir=Path(config.run_dir), say=lambda _m: None)


def runner_loop(ctx: Any, arrays: Any) -> tuple[float, Any]:
  """Seconds of one task through ``train_task`` (it ends with a fetch: the device is done)."""
  state = RunState(config_hash="benchmark", phase="train", position=Position().to_dict())
  t0 = time.perf_counter()
  arrays = train_task(ctx, state, arrays)
  return time.perf_counter() - t0, arrays


def bare_loop(ctx: Any, arrays: Any, batches: list[dict[str, Any]]) -> tuple[float, Any]:
  """Seconds of the same steps in a plain loop over collated batches."""
  step = ctx.step.for_task(step_lib.Schedule.of(ctx.config.optimizer, len(batches)))
  params, opt_state = ctx.layout.place_state(arrays.params, arrays.opt_state)
  carry = ctx.layout.put_replicated(step_lib.start_carry(0))
  t0 = time.perf_counter()
  for b in batches:
    params, opt_state, carry, metrics = step(params, opt_state, ctx.layout.put_batch(b), carry)
  jax.block_until_ready((params, opt_state, metrics))
  return time.perf_counter() - t0, arrays._replace(params=params, opt_state=opt_state)


def measure(name: str, steps: int, repeats: int, log_every: int) -> dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    ctx, arrays = setup(name, steps, log_every, Path(tmp))
    it = train_iterator(ctx, 0, None)
    batches = [next(it) for _ in range(steps)]
    mine = arrays
    theirs = arrays._replace(params=jax.tree.map(jnp.copy, arrays.params),
                             opt_state=jax.tree.map(jnp.copy, arrays.opt_state))
    _, mine = runner_loop(ctx, mine)  # warm-up: compiles every batch shape
    _, theirs = bare_loop(ctx, theirs, batches)
    runner_s, bare_s = [], []
    for _ in range(repeats):
      dt, mine = runner_loop(ctx, mine)
      runner_s.append(dt)
      dt, theirs = bare_loop(ctx, theirs, batches)
      bare_s.append(dt)
    ctx.writer.close()
  ratios = sorted(b / r for r, b in zip(runner_s, bare_s))  # (steps/runner_s) / (steps/bare_s)
  q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
  return {"model": name, "steps": steps, "repeats": repeats, "log_every": log_every,
          "runner_steps_per_s": round(steps / statistics.median(runner_s), 2),
          "bare_steps_per_s": round(steps / statistics.median(bare_s), 2),
          "ratio": round(statistics.median(ratios), 4), "ratio_iqr": [round(q[0], 4), round(q[2], 4)],
          "target": 0.97}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="demo,cpu_small", help="comma-separated: demo, cpu_small")
  parser.add_argument("--steps", type=int, default=40, help="steps per repeat")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--log-every", type=int, default=10, help="the runner's fetch interval (training.log_every)")
  args = parser.parse_args()
  for name in args.models.split(","):
    print(json.dumps(measure(name.strip(), args.steps, args.repeats, args.log_every)), flush=True)


if __name__ == "__main__":
  main()
