"""The ``clsvd`` command line.

  clsvd train CONFIG.yaml [--set key=value ...] [--resume | --overwrite]
                                                              run a task stream (results under run_dir); on several
                                                              hosts run it on each (jax.distributed from the env)
  clsvd eval CONFIG.yaml [--set ...] [--checkpoint DIR]       evaluate a model (or a checkpoint) on every task
  clsvd compare CONFIG.yaml --methods seqft,osft,... [--seeds 0,1,2] [--out DIR] [--set ...]
                                                              every method (and seed) on the config's stream, one
                                                              run each (resumable), then one table and one plot
  clsvd demo [--out runs/demo] [--seeds 0,1,2]               the offline demo: seqft vs osft on a tiny model
  clsvd inspect RUN_DIR [--memory CONFIG]                     tables and plots of a finished run

Errors in the config or the data are printed as one clear message (exit status 2). A run that stops on a
non-finite loss exits with status 3 and names the last good checkpoint; a run that diverged (see
``run_state.divergence``) finishes, writes its results and exits with status 4; a run the watchdog stopped (no
progress for training.watchdog_seconds) exits with status 5, and one stopped by SIGTERM with 143, both naming the
phase and the last checkpoint. ``clsvd compare`` exits with status 3 when one of its runs failed (the others are
compared; rerunning the command resumes it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_TRAINING = 3
EXIT_DIVERGED = 4
EXIT_STALLED = 5  # = watchdog.EXIT_STALLED, also the status of a process the watchdog has to end
EXIT_SIGTERM = 128 + 15


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="clsvd", description="Continual full fine-tuning with orthogonal-complement "
                                                        "updates (adaptive SVD / OSFT) in JAX.")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="run a task stream from a YAML config")
  t.add_argument("config", help="YAML config (see configs/)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set training.seed=3 (repeatable; values are YAML)")
  t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
  t.add_argument("--overwrite", action="store_true", help="delete what run_dir holds and start again (without it, "
                                                          "a run_dir with files is refused)")
  t.add_argument("--run-dir", help="output folder (overrides run_dir of the config)")

  e = sub.add_parser("eval", help="evaluate a model or a checkpoint on every task of a config")
  e.add_argument("config")
  e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  e.add_argument("--checkpoint", help="a checkpoint folder (step_*) or a run directory (its newest checkpoint); "
                                      "default: the model of the config as it is")
  e.add_argument("--out", help="write the accuracies as JSON here")

  c = sub.add_parser("compare", help="run several methods (and seeds) on one stream, then one table and one plot")
  c.add_argument("config", help="YAML config (its method is replaced by each of --methods)")
  c.add_argument("--methods", required=True, help="comma-separated methods, e.g. seqft,osft,replay,ewc,lora,olora,"
                                                  "gpm,pertask,mtl")
  c.add_argument("--seeds", default="0", help="comma-separated seeds (training.seed and model.init_seed), default 0")
  c.add_argument("--out", help="output folder: one run per method and seed, the table and the plot (default "
                               "runs/compare/<config name>)")
  c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value of every run (repeatable)")

  d = sub.add_parser("demo", help="the offline demo: a tiny model, a generated task stream, seqft vs osft")
  d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
  d.add_argument("--steps", type=int, default=None, help="optimizer steps per task (default: the demo's)")
  d.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the model init and data order (default "
                                                  "0,1,2: the figures are their mean and spread)")
  d.add_argument("--quiet", action="store_true", help="no progress bars")

  i = sub.add_parser("inspect", help="tables and plots of a finished run (or a memory estimate)")
  i.add_argument("run_dir", nargs="?", help="a run directory with results.json")
  i.add_argument("--memory", metavar="CONFIG", help="per-device memory of a config's model on its mesh (a YAML run "
                                                    "config, a model preset or a config.json)")
  i.add_argument("--accelerator", help="with --memory: e.g. v5p-64 (device count and memory per device)")
  i.add_argument("--devices", type=int, help="with --memory: number of devices (default: the accelerator's, else "
                                             "the devices of this machine)")
  i.add_argument("--no-plots", action="store_true", help="do not (re)write the plots")
  return p


def _error(msg: str, code: int = EXIT_BAD_INPUT) -> int:
  print(f"clsvd: error: {msg}", file=sys.stderr)
  return code


def _load(path: str, overrides: Sequence[str], run_dir: str | None = None) -> Any:
  from clsvd_jax import config as config_lib

  cfg = config_lib.load_config(path, overrides)
  if run_dir:
    cfg.run_dir = run_dir
  return cfg


def cmd_train(args: argparse.Namespace) -> int:
  cfg = _load(args.config, args.overrides, args.run_dir)
  # Before anything touches a device: on a pod (or with JAX_COORDINATOR_ADDRESS) every worker runs this same
  # command and they join into one JAX runtime here.
  from clsvd_jax.parallel import distributed

  try:
    distributed.initialize_from_env(cfg.distributed.init_kwargs())
  except ValueError as e:
    return _error(f"distributed: {e}")
  from clsvd_jax.train import runner

  res = runner.run(cfg, resume=args.resume, overwrite=args.overwrite)
  if distributed.is_main_process():
    print(f"results in {cfg.run_dir}")
  if res["diverged"]:
    return _error(f"training diverged on {', '.join(res['diverged'])} (a step larger than the weights, or a loss "
                  "that rose 1.5-fold over the task to above chance; see the warnings above); the results are "
                  "written, but lower optimizer.lr", EXIT_DIVERGED)
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  from clsvd_jax.train import evaluate as eval_lib
  from clsvd_jax.train import model_io, outputs, runner

  cfg = _load(args.config, args.overrides)
  p = runner.prepare(cfg)
  _, params = model_io.functional(p.model)
  source = "the model of the config"
  if args.checkpoint:
    loaded = runner.restore_params(cfg, p, args.checkpoint)
    for note in loaded.notes():
      print(f"note: {note}")
    params, source = loaded.value, str(loaded.path)
  res = eval_lib.evaluate_all(p.model, params, p.eval_splits, p.tokenizer, p.info, batch_size=cfg.eval.batch_size,
                              max_new_tokens=cfg.eval.max_new_tokens, names=p.names,
                              show_progress=cfg.training.progress, labels=p.labels or None)
  width = max(len(n) for n in p.names) + 2
  print(f"accuracy of {source}:")
  for r in res:
    rate = "" if r.option_rate is None else f"  answers in the label set {100 * r.option_rate:5.1f}%"
    print(f"  {r.task.ljust(width)} {100 * r.accuracy:6.1f}%  ({r.correct}/{r.total}){rate}")
  data = {"source": source, "tasks": p.names, "accuracy": [r.accuracy for r in res],
          "correct": [r.correct for r in res], "total": [r.total for r in res],
          "option_rate": [r.option_rate for r in res],
          "predictions": {r.task: r.predictions[:20] for r in res}}
  if args.out:
    outputs.write_json(args.out, data)
  return 0


def cmd_compare(args: argparse.Namespace) -> int:
  from clsvd_jax.train import compare

  methods = compare.parse_methods(args.methods)
  seeds = compare.parse_seeds(args.seeds)
  out = args.out or str(Path("runs") / "compare" / Path(args.config).stem)
  summary, outcomes = compare.compare(args.config, methods, seeds, out, args.overrides)
  failed = [o for o in outcomes if o.results is None]
  if failed:
    return _error(f"compare: {len(failed)} of {len(outcomes)} runs failed ("
                  + ", ".join(o.spec.label for o in failed) + "); see the logs in " + str(Path(out) / "logs")
                  + ", then rerun the same command to resume them", EXIT_TRAINING)
  return 0


def cmd_demo(args: argparse.Namespace) -> int:
  from clsvd_jax.train import demo

  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    return _error(f"demo --seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
  if not seeds:
    return _error("demo --seeds: give at least one seed, e.g. --seeds 0")
  demo.run_demo(args.out, seeds=seeds, steps=args.steps, progress=not args.quiet)
  return 0


def _memory_report(target: str, *, accelerator: str | None = None, devices: int | None = None) -> str:
  """The hook of ``--memory``: ``clsvd_jax.parallel`` computes it (per-device bytes of params, moments, bases)."""
  from clsvd_jax import parallel

  hook = getattr(parallel, "inspect_memory", None)
  if hook is not None:
    return hook(target, accelerator=accelerator, devices=devices)
  kwargs: dict[str, Any] = {}
  if accelerator:
    kwargs["accelerator"] = accelerator
  if devices or not accelerator:
    import jax

    kwargs["devices"] = devices or jax.device_count()
  model_config: Any = target
  if target.endswith((".yaml", ".yml")):
    from clsvd_jax.train import step as step_lib

    cfg = _load(target, [])
    m = cfg.model
    if m.path is not None:
      model_config = m.path if Path(m.path).is_absolute() else str(Path(cfg.data_dir or ".") / m.path)
    else:
      model_config = {"model_type": m.family, **(m.config or {})}
    # Float32 master weights whatever model.dtype reads the checkpoint in (docs/design.md §6b); bf16 compute adds a
    # copy.
    kwargs |= {"dtype": "float32", "compute_dtype": "bfloat16" if cfg.training.bf16_compute else None,
               "policy": step_lib.policy_of_run(cfg).policy, "max_rank_ratio": cfg.osft.max_rank_ratio}
    if cfg.mesh is not None:
      kwargs["mesh_shape"] = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
  return parallel.format_memory_report(parallel.memory_report(model_config, **kwargs))


def cmd_inspect(args: argparse.Namespace) -> int:
  from clsvd_jax.train import outputs

  if args.memory:
    try:
      print(_memory_report(args.memory, accelerator=args.accelerator, devices=args.devices))
    except ValueError as e:
      return _error(f"inspect --memory {args.memory}: {e}")
    if not args.run_dir:
      return 0
  if not args.run_dir:
    return _error("inspect: give a run directory (or --memory CONFIG)")
  results = outputs.read_results(args.run_dir)
  print(f"run {args.run_dir}: method {results.get('method')}, tasks {', '.join(results['tasks'])}")
  print()
  print(outputs.format_r_table(results, title="R (accuracy %, row = after training that task)"))
  print()
  options = outputs.format_option_table(results, title="option rate (% of answers that are one of the task's labels)")
  if options:
    print(options)
    print()
  ranks = outputs.format_rank_table(results, title="rank classification (accuracy %: the likeliest label option)")
  if ranks:
    print(ranks)
    print()
  print(outputs.format_summary(results))
  print()
  print(outputs.format_ranks(results))
  inv = results.get("invariant") or []
  if any(inv):
    worst = max(((path, max(r["left"], r["right"], r["block"]), i) for i, task in enumerate(inv)
                 for path, r in task.items()), key=lambda x: x[1])
    print(f"\ninvariant: largest ratio {worst[1]:.2e} at {worst[0]} during task {worst[2] + 1}")
  if not args.no_plots:
    files = outputs.write_plots(results, args.run_dir)
    print("\nplots: " + ", ".join(str(f) for f in files))
  return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "demo": cmd_demo, "inspect": cmd_inspect}


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``clsvd`` script; returns the exit status."""
  args = _parser().parse_args(argv)
  from clsvd_jax.config import ConfigError
  from clsvd_jax.data.tasks import DataError
  from clsvd_jax.train.checkpoint import CheckpointError
  from clsvd_jax.train.outputs import RunPathError
  from clsvd_jax.train.runner import RunStalled, RunTerminated, TrainingError

  try:
    return COMMANDS[args.command](args)
  except ConfigError as e:
    msg = str(e)
    # Checks that need the built run (devices, model, data) name the key; the file is named here, once for all.
    if args.command in ("train", "eval") and not msg.startswith(f"{args.config}:"):
      msg = f"{args.config}: {msg}"
    return _error(msg)
  except (DataError, RunPathError, CheckpointError) as e:
    return _error(str(e))
  except FileNotFoundError as e:
    return _error(str(e))
  except TrainingError as e:
    return _error(str(e), EXIT_TRAINING)
  except RunStalled as e:
    return _error(f"watchdog: {e}", EXIT_STALLED)
  except RunTerminated as e:
    return _error(str(e), EXIT_SIGTERM)


if __name__ == "__main__":
  sys.exit(main())
