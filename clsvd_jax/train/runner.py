"""The continual-learning runner: a model through a stream of tasks, with evaluation after every task.

``run(config)`` does, for each stage of the method (one task at a time, or all at once for ``mtl``):

1. the task boundary: the task scheduler measures block importance, computes protected ranks, accumulates and
   installs the subspaces (constrained methods only), and Adam's moments are optionally reset;
2. training: the jitted step over fixed-shape batches, with a learning-rate schedule per task, a NaN/inf check
   that stops the run with the last good checkpoint intact, checkpoints every N steps, TensorBoard and tqdm;
3. the invariant check (``||U^T dW|| / ||dW||``, ``||dW V|| / ||dW||`` of every constrained matrix over the task);
4. evaluation of every task of the stream (also those not trained yet, for FWT) -> one row of R;
5. a checkpoint at the task boundary.

At the end it writes ``results.json``, ``R.csv``, the plots and returns the results dict. ``resume=True``
continues from the newest checkpoint of ``run_dir`` and produces the same results as an uninterrupted run.

Several processes (``jax.distributed``, initialised by ``clsvd train`` before anything touches a device): every
process runs ``run`` with the same config on one mesh over all devices (``config.mesh``, else every device on
``fsdp``). Each host reads only its rows of every training batch (``BatchIterator`` host slicing) and contributes
them to the global batch; calibration and evaluation batches are small and read whole by every host (JAX treats
them as replicated), and results computed on sharded parameters come back through collectives, so every process
holds the same R, ranks and invariant. Only process 0 prints, draws progress bars, writes TensorBoard,
``config.yaml``, ``results.json``, ``R.csv`` and the plots; all processes write and read the Orbax checkpoints
together (``run_dir`` must be a folder every host sees, e.g. a bucket on a pod).

``run_dir`` is an ``etils.epath`` path (``outputs.run_path``): a local folder or a URL (``gs://bucket/run``).
With a URL, TensorBoard writes to a local temporary folder that is copied to ``<run_dir>/tensorboard`` at every
task boundary and at the end (``_Writer``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import clsvd_jax as cj
from clsvd_jax import scheduler as sched_lib
from clsvd_jax.config import ConfigError, MeshConfig, RunConfig, dump_config
from clsvd_jax.data import (
  BatchIterator,
  EncodedSplit,
  encode_task,
  load_tasks,
  parse_task_specs,
  tokenizer_info,
)
from clsvd_jax.data.tasks import DataError
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import covariance, model_io, outputs
from clsvd_jax.train import evaluate as eval_lib
from clsvd_jax.train import metrics as metrics_lib
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.methods import get_method

log = logging.getLogger("clsvd_jax.train")


class TrainingError(RuntimeError):
  """The run stopped: a non-finite loss or gradient. The message names the step and the last good checkpoint."""


class RunInterrupted(RuntimeError):
  """Raised by ``run(..., stop_after_steps=N)`` to simulate a killed run (tests of ``--resume``)."""


@dataclasses.dataclass
class Prepared:
  """Everything a run needs before its first step (built once; also used by ``clsvd eval``)."""

  config: RunConfig
  model: Any
  tokenizer: Any
  info: Any
  kind: str
  names: list[str]
  train_splits: list[EncodedSplit]
  eval_splits: list[EncodedSplit]
  notes: list[str]
  labels: list[tuple[str, ...] | None] = dataclasses.field(default_factory=list)


def prepare(config: RunConfig) -> Prepared:
  """Builds the model and tokenizer and reads and encodes the whole stream (bad data fails here, not at task 7).

  Raises:
    ConfigError / DataError: naming the file or key and the fix.
  """
  base = config.data_dir
  specs = parse_task_specs(config.tasks)
  datas = load_tasks(specs, base_dir=base)
  # The tasks first: a 'bpe' tokenizer learns its vocabulary from their training text.
  tokenizer = model_io.load_tokenizer(config.model, base_dir=base, tasks=datas)
  model = model_io.build_model(config.model, base_dir=base)
  model_io.check_vocab(model, tokenizer)
  kind = model_io.kind_of(model)
  info = tokenizer_info(tokenizer, kind)
  train_splits, eval_splits, notes = [], [], []
  for data in datas:
    if not data.train:
      raise DataError(f"task '{data.task.name}': the training split '{data.task.splits['train']}' is empty")
    if not data.eval:
      raise DataError(f"task '{data.task.name}': the evaluation split '{data.task.splits['eval']}' is empty")
    tr, ev = encode_task(data, tokenizer, kind=kind, max_length=config.training.max_length,
                         max_target_length=config.training.max_target_length)
    train_splits.append(tr)
    eval_splits.append(ev)
    notes.extend(data.notes)
    for split in (tr, ev):
      if split.truncated_prompts or split.truncated_targets:
        notes.append(split.report())
  return Prepared(config, model, tokenizer, info, kind, [d.task.name for d in datas], train_splits, eval_splits,
                  notes, labels=[d.task.labels for d in datas])


def _config_hash(config: RunConfig) -> str:
  """What must not change between a run and its resume (everything but where outputs go and display flags)."""
  d = config.to_dict()
  for key in ("run_dir", "name", "distributed"):
    d.pop(key, None)
  d["training"] = {k: v for k, v in d["training"].items() if k not in ("progress", "log_every", "checkpoint_every",
                                                                        "keep_checkpoints")}
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _steps_for(config: RunConfig, it: BatchIterator) -> int:
  t = config.training
  return t.steps_per_task if t.steps_per_task is not None else t.epochs * it.steps_per_epoch


def _stage_name(names: list[str], stage: list[int]) -> str:
  return names[stage[0]] if len(stage) == 1 else "+".join(names[i] for i in stage)


class _Writer:
  """TensorBoard scalars (tensorboardX); a no-op when the package is missing or when not ``enabled`` (processes
  other than 0).

  A ``run_dir`` that is a URL: tensorboardX writes ``gs://`` only through google-cloud-storage (and no other
  scheme), so the event files go to a local temporary folder and ``sync`` copies them whole to
  ``<run_dir>/tensorboard`` (at task boundaries and on ``close``); they are small (a few scalars per step).
  """

  def __init__(self, run_dir: epath.Path, enabled: bool = True):
    self._w = None
    self._local: Path | None = None
    self._remote: epath.Path | None = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      return
    logdir = run_dir / "tensorboard"
    if outputs.is_local(logdir):
      self._w = SummaryWriter(str(logdir))
    else:
      self._local = Path(tempfile.mkdtemp(prefix="clsvd-tensorboard-"))
      self._remote = logdir
      self._w = SummaryWriter(str(self._local))

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._w is not None:
      self._w.add_scalar(tag, float(value), step)

  def sync(self) -> None:
    """Copies the event files to a ``run_dir`` URL; nothing to do for a local one (tensorboardX writes there)."""
    if self._w is None or self._remote is None:
      return
    self._w.flush()
    self._upload()

  def _upload(self) -> None:
    try:
      for f in sorted(self._local.rglob("*")):
        if f.is_file():
          (self._remote / f.relative_to(self._local).as_posix()).write_bytes(f.read_bytes())
    except OSError as e:
      # The logs are a view of the run, not its results: a failed upload must not stop training.
      log.warning("could not copy the TensorBoard logs to %s: %s", self._remote, e)

  def close(self) -> None:
    if self._w is not None:
      self._w.flush()
      self._w.close()
      if self._remote is not None:
        self._upload()
        shutil.rmtree(self._local, ignore_errors=True)
      self._w = None


def run(config: RunConfig, *, resume: bool = False, stop_after_steps: int | None = None,
        echo: Callable[[str], None] | None = print, prepared: Prepared | None = None) -> dict[str, Any]:
  """Runs the method of ``config`` through its task stream; see the module docstring.

  Args:
    config: a validated config (``clsvd_jax.config.load_config``).
    resume: continue from the newest checkpoint in ``config.run_dir`` (a fresh start when there is none).
    stop_after_steps: raise ``RunInterrupted`` after this many optimizer steps of this call (tests).
    echo: prints progress lines (None: silent).
    prepared: a ``prepare(config)`` result to reuse.

  Returns:
    The results dict (also written to ``<run_dir>/results.json``).

  Raises:
    TrainingError: on a non-finite loss or gradient.
    ConfigError / DataError: bad config or data (before training starts).
  """
  main = jax.process_index() == 0
  say = (echo if main else None) or (lambda _msg: None)
  try:
    run_dir = outputs.run_path(config.run_dir)
  except ValueError as e:
    raise ConfigError(f"run_dir: {e}") from None
  outputs.make_dirs(run_dir)
  p = prepared or prepare(config)
  for note in p.notes:
    say(f"note: {note}")
  method = get_method(config.method)
  tcfg = config.training
  num_tasks = len(p.names)
  stages = method.stages(num_tasks)
  model = p.model

  apply_fn, params = model_io.functional(model)
  run_policy = step_lib.policy_of_run(config)
  policy_counts = step_lib.check_policy(params, run_policy.policy)
  policy_record = run_policy.to_dict(params)
  labels = run_policy.policy.labels(params)
  tx, train_step, raw_step = _optimizer_and_step(config, model, apply_fn, labels, p.kind, method.constrained)
  mesh, repl, host_split = None, None, (0, 1)
  mesh_cfg = config.mesh
  if mesh_cfg is None and jax.process_count() > 1:
    # Parameters of a multi-host model do not fit one device: the default spreads them over all (FSDP).
    mesh_cfg = MeshConfig()
  if mesh_cfg is not None:
    mesh, params, opt_state, train_step, put_batch, o_sh, host_split = _on_mesh(
        mesh_cfg, tcfg.batch_size, tx, raw_step, params, p.kind)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  else:
    opt_state = tx.init(params)
    put_batch, o_sh = None, None
  shapes = {path: s for path, s in model_io.constrained_matrices(model).items()
            if cj.flatten_with_paths(labels).get(path) == "constrain"}
  scheduler = None
  if method.constrained:
    compute = None
    if mesh is not None:
      from clsvd_jax import parallel

      compute = functools.partial(parallel.compute_subspaces_sharded, mesh=mesh)
    scheduler = sched_lib.TaskScheduler(config.osft, shapes, len(stages), compute_fn=compute)
  rng = jax.random.key_data(jax.random.key(tcfg.seed))
  anchor = {path: jnp.zeros((), jnp.float32) for path in shapes}
  if repl is not None:
    # Checkpointed with the sharded state: Orbax needs global arrays when several processes save.
    rng, anchor = jax.device_put((np.asarray(rng), {k: np.asarray(v) for k, v in anchor.items()}), repl)

  # Run state (everything in meta.json).
  state: dict[str, Any] = {"stage": 0, "step": 0, "position": None, "global_step": 0, "phase": "boundary",
                           "R": [], "counts": [], "baseline": None, "baseline_counts": None, "invariant": [],
                           "losses": [], "tokens": 0, "train_seconds": 0.0, "eval_seconds": 0.0,
                           "option_rates": [], "baseline_option_rate": None, "config_hash": _config_hash(config)}
  last_ckpt: epath.Path | None = None
  if resume:
    found = ckpt_lib.agreed_latest_checkpoint(run_dir)
    if found is not None:
      meta = ckpt_lib.read_meta(found)
      if meta["run"]["config_hash"] != state["config_hash"]:
        raise ConfigError(f"--resume: the checkpoint {found} was written with another config (hash "
                          f"{meta['run']['config_hash']} vs {state['config_hash']}); resume with the same config "
                          "or start a new run_dir")
      if meta.get("anchor_paths"):
        # Restore target: same shapes and layout as the weights.
        flat = cj.flatten_with_paths(params)
        anchor = _copy_f32({path: flat[path] for path in meta["anchor_paths"]})
      target = {"params": params, "opt_state": opt_state, "anchor": anchor, "rng": rng}
      restored = ckpt_lib.restore(found, target)
      params, opt_state, anchor, rng = (restored["params"], restored["opt_state"], restored["anchor"],
                                        restored["rng"])
      state = meta["run"]
      state.setdefault("option_rates", [])
      state.setdefault("baseline_option_rate", None)
      if scheduler is not None:
        scheduler = sched_lib.TaskScheduler.from_dict(config.osft, meta["scheduler"], compute_fn=scheduler.compute_fn)
      last_ckpt = found
      say(f"resumed from {found} (stage {state['stage'] + 1}/{len(stages)}, step {state['step']}, "
          f"phase {state['phase']})")
  if main and (not resume or last_ckpt is None):
    dump_config(config, run_dir / "config.yaml")

  writer = _Writer(run_dir, enabled=main)
  progress = tcfg.progress and main
  eval_kw = dict(batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens, names=p.names,
                 show_progress=progress)

  def evaluate(params: Any, desc: str, row: str | None) -> tuple[list[float], list[int], list[int], list[Any]]:
    """Accuracy, correct answers, totals and option rates per task; the predictions go to a file (row None: the
    model before training)."""
    t0 = time.perf_counter()
    res = eval_lib.evaluate_all(model, params, p.eval_splits, p.tokenizer, p.info, progress_desc=desc,
                                labels=p.labels or None, **eval_kw)
    state["eval_seconds"] += time.perf_counter() - t0
    if main:
      outputs.write_predictions(run_dir, row, [rec for r in res for rec in r.records()])
    return [r.accuracy for r in res], [r.correct for r in res], [r.total for r in res], [r.option_rate for r in res]

  def save(params: Any, opt_state: Any) -> epath.Path:
    arrays = {"params": params, "opt_state": opt_state, "anchor": anchor, "rng": rng}
    meta = {"run": state, "scheduler": scheduler.to_dict() if scheduler is not None else None,
            "anchor_paths": sorted(anchor) if any(np.ndim(a) for a in anchor.values()) else [],
            "tasks": p.names, "method": config.method}
    return ckpt_lib.save(run_dir, state["global_step"], arrays, meta, keep=tcfg.keep_checkpoints)

  counter = [0]  # optimizer steps of this call
  try:
    if state["baseline"] is None and config.eval.initial:
      acc, correct, total, rates = evaluate(params, "eval initial", None)
      state["baseline"], state["baseline_counts"], state["baseline_option_rate"] = acc, correct, rates
      say("initial accuracy: " + ", ".join(f"{n}={100 * a:.1f}" for n, a in zip(p.names, acc)))

    while state["stage"] < len(stages):
      si = state["stage"]
      stage = stages[si]
      name = _stage_name(p.names, stage)
      train_data = p.train_splits[stage[0]] if len(stage) == 1 else EncodedSplit.concat(
          [p.train_splits[i] for i in stage], name=name)
      it = BatchIterator(train_data, p.info, batch_size=tcfg.batch_size, seed=tcfg.seed + si, num_epochs=None,
                         position=state["position"], process_index=host_split[0], process_count=host_split[1])
      total_steps = _steps_for(config, it)

      if state["phase"] == "boundary":
        if scheduler is not None:
          inputs = _boundary_inputs(config, model, params, p, stage, stages, si, it)
          opt_state = scheduler.before_task(si, params, opt_state, inputs)
          rec = scheduler.records[-1]
          if rec["protected"]:
            mean_ratio = np.mean([np.mean(v) for v in rec["rank_ratio"].values()]) if rec["rank_ratio"] else 0.0
            say(f"task {si + 1}/{len(stages)} {name}: protected {100 * mean_ratio:.1f}% of the directions "
                f"(policy {rec['policy']}, basis {rec['basis_source']})")
        if config.osft.reset_moments and si > 0:
          opt_state = sched_lib.reset_moments(tx, params, opt_state) if method.constrained else tx.init(params)
          if o_sh is not None:
            opt_state = jax.device_put(opt_state, o_sh)
        if config.eval.invariant_check and scheduler is not None:
          flat = cj.flatten_with_paths(params)
          # A fresh float32 copy in the weights' own layout (the step donates the params' buffers).
          anchor = _copy_f32({path: flat[path] for path in shapes})
        state.update(phase="train", step=0, position=it.position.to_dict())

      if state["phase"] == "train":
        params, opt_state = _train_stage(
            config, train_step, params, opt_state, it, total_steps, state, writer, name, si, len(stages),
            save, put_batch=put_batch, counter=counter, progress=progress,
            stop=lambda: stop_after_steps is not None and counter[0] >= stop_after_steps)
        # Invariant over the task: protected directions of every constrained matrix untouched.
        ratios = {}
        if config.eval.invariant_check and scheduler is not None:
          subs = {path: s for path, s in cj.flatten_with_paths(cj.get_subspaces(opt_state),
                                                                 is_leaf=sched_lib._is_node).items()
                  if isinstance(s, cj.Subspace)}
          ratios = metrics_lib.invariant_ratios(anchor, cj.flatten_with_paths(params), subs,
                                                steps=state["step"])
        state["invariant"].append(ratios)
        state["phase"] = "eval"

      if state["phase"] == "eval":
        acc, correct, total, rates = evaluate(params, f"eval after {name}", name)
        state["R"].append(acc)
        state["option_rates"].append(rates)
        state["counts"].append(correct)
        state["totals"] = total
        say(f"after {name}: " + ", ".join(f"{n}={100 * a:.1f}" for n, a in zip(p.names, acc)))
        for n, a in zip(p.names, acc):
          writer.scalar(f"eval/{n}", a, si)
        state.update(stage=si + 1, phase="boundary", step=0, position=None)
        last_ckpt = save(params, opt_state)
        writer.sync()
  finally:
    writer.close()

  results = _results(config, p, state, scheduler, policy_counts, policy_record)
  if main:
    outputs.write_outputs(results, run_dir)
  say(outputs.format_r_table(results, title=f"[{config.method}] R (accuracy %)"))
  options = outputs.format_option_table(results, title=f"[{config.method}] option rate (% of answers that are a label)")
  if options:
    say(options)
  say(outputs.format_summary(results))
  return results


def restore_params(config: RunConfig, p: Prepared, ckpt: str | os.PathLike[str]) -> Any:
  """The parameters saved in a checkpoint of a run of ``config`` (for ``clsvd eval --checkpoint``)."""
  method = get_method(config.method)
  apply_fn, params = model_io.functional(p.model)
  labels = step_lib.policy_of_run(config).policy.labels(params)
  tx, _, _ = _optimizer_and_step(config, p.model, apply_fn, labels, p.kind, method.constrained)
  meta = ckpt_lib.read_meta(ckpt)
  shapes = model_io.constrained_matrices(p.model)
  full = set(meta.get("anchor_paths") or [])
  anchor = {path: jnp.zeros(shapes[path] if path in full else (), jnp.float32)
            for path in shapes if cj.flatten_with_paths(labels).get(path) == "constrain"}
  rng = jax.random.key_data(jax.random.key(0))
  target = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "anchor": anchor, "rng": rng}
  target["opt_state"] = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), target["opt_state"])
  return ckpt_lib.restore(ckpt, target)["params"]


# Jitted train steps by everything they depend on, so runs in one process (the demo's two methods, a resume in a
# test) do not compile the same step again.
_STEP_CACHE: dict[str, tuple[Any, Any]] = {}


def _optimizer_and_step(config: RunConfig, model: Any, apply_fn: Any, labels: Any, kind: str,
                        constrained: bool) -> tuple[Any, Any, Any]:
  """``(tx, jitted step, raw step)`` for a run, cached by everything they depend on."""
  ocfg, tcfg, o = config.optimizer, config.training, config.osft
  key = json.dumps({"model": model_io.model_config_dict(model), "family": model_io.family_of(model), "kind": kind,
                    "optimizer": dataclasses.asdict(ocfg), "bf16": tcfg.bf16_compute, "constrained": constrained,
                    "osft": [o.sides, o.project_gradients, o.max_rank_ratio], "labels": cj.flatten_with_paths(labels)},
                   sort_keys=True, default=str)
  if key not in _STEP_CACHE:
    tx = step_lib.build_optimizer(ocfg, o, constrained=constrained, policy=step_lib.policy_of_run(config).policy)
    trainable = jax.tree.map(lambda a: a != "freeze", labels)
    raw = step_lib.make_train_step(apply_fn, tx, kind=kind, grad_accum=ocfg.grad_accum,
                                   bf16_compute=tcfg.bf16_compute, clip_norm=ocfg.clip_norm, trainable=trainable)
    while len(_STEP_CACHE) >= 4:
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    _STEP_CACHE[key] = (tx, step_lib.jit_step(raw), raw)
  return _STEP_CACHE[key]


@jax.jit
def _copy_f32(tree: Any) -> Any:
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _on_mesh(m: MeshConfig, batch_size: int, tx: Any, raw_step: Any, params: Any, kind: str) -> tuple[Any, ...]:
  """Lays params and optimizer state out on the mesh ``m`` (``clsvd_jax.parallel``: FSDP / tensor rules, bases
  following their weights) and jits the step with explicit shardings; batches are split over data x fsdp.

  Returns:
    ``(mesh, params, opt_state, step, put_batch, opt_state_shardings, host_split)``: ``host_split`` is the
    ``(process_index, process_count)`` the training ``BatchIterator`` slices by, and ``put_batch`` turns the
    rows it yields into the global batch. Where this host's devices do not hold one contiguous, even share of the
    rows in process order (e.g. a mesh that replicates the batch over hosts), the host reads whole batches
    (``(0, 1)``) and ``put_batch`` keeps the rows its devices hold.
  """
  from jax.sharding import NamedSharding, PartitionSpec

  from clsvd_jax import parallel
  from clsvd_jax.parallel import distributed

  mesh = parallel.make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor})
  params, opt_state, p_sh, o_sh = parallel.shard_training_state(params, tx, mesh)
  repl = NamedSharding(mesh, PartitionSpec())
  spec = parallel.batch_spec(2)
  keys = step_lib.TRAIN_KEYS[kind]
  b_sh = {k: NamedSharding(mesh, spec) for k in keys}
  step = jax.jit(raw_step, in_shardings=(p_sh, o_sh, b_sh, repl), out_shardings=(p_sh, o_sh, repl),
                 donate_argnums=(0, 1))

  index, count = jax.process_index(), jax.process_count()
  rows = distributed.host_rows(b_sh[keys[0]], (batch_size, 1))
  share = batch_size // count
  sliced = batch_size % count == 0 and rows == slice(index * share, (index + 1) * share)
  host_split = (index, count) if sliced else (0, 1)

  def put_batch(batch: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      out[k] = distributed.make_global_array(v if sliced else v[rows], b_sh[k], (batch_size, *v.shape[1:]))
    return out

  return mesh, params, opt_state, step, put_batch, o_sh, host_split


def _train_stage(config: RunConfig, train_step: Any, params: Any, opt_state: Any, it: BatchIterator,
                 total_steps: int, state: dict[str, Any], writer: _Writer, name: str, si: int, num_stages: int,
                 save: Callable[[Any, Any], epath.Path], *, put_batch: Callable[[Any], Any] | None,
                 stop: Callable[[], bool], counter: list[int], progress: bool) -> tuple[Any, Any]:
  """The optimizer steps of one stage, from ``state['step']`` to ``total_steps``."""
  tcfg = config.training
  timer = step_lib.StepTimer()
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], desc=f"task {si + 1}/{num_stages} {name}", unit="step",
               leave=False)
  losses = []
  try:
    while state["step"] < total_steps:
      if stop():
        raise RunInterrupted(f"stopped after {counter[0]} steps (stop_after_steps)")
      batch = next(it)
      if put_batch is not None:
        batch = put_batch({k: batch[k] for k in step_lib.TRAIN_KEYS[it.data.kind]})
      else:
        batch = step_lib.device_batch(batch, it.data.kind)
      lr = step_lib.learning_rate(state["step"], total_steps, config.optimizer)
      t0 = time.perf_counter()
      params, opt_state, m = train_step(params, opt_state, batch, jnp.asarray(lr, jnp.float32))
      loss = float(m["loss"])
      dt = time.perf_counter() - t0
      if not bool(m["finite"]):
        last = ckpt_lib.latest_checkpoint(config.run_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"non-finite loss ({loss}), gradient norm ({float(m['grad_norm'])}) or update norm "
            f"({float(m['update_norm'])}) at step {state['step'] + 1} of "
            f"task {si + 1} ({name}), global step {state['global_step'] + 1}; the run stopped and nothing was "
            f"saved after it: {where}. Lower optimizer.lr, set optimizer.clip_norm, or try "
            "training.bf16_compute: false; then rerun with --resume")
      tokens = float(m["tokens"])
      tps = timer.add(dt, tokens)
      state["step"] += 1
      state["global_step"] += 1
      state["tokens"] += tokens
      state["train_seconds"] += dt
      state["position"] = it.position.to_dict()
      counter[0] += 1
      losses.append(loss)
      if tcfg.log_every and (state["step"] % tcfg.log_every == 0 or state["step"] == total_steps):
        writer.scalar("train/loss", loss, state["global_step"])
        writer.scalar("train/tokens_per_s", tps, state["global_step"])
        writer.scalar("train/lr", lr, state["global_step"])
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
      if tcfg.checkpoint_every and state["global_step"] % tcfg.checkpoint_every == 0 and state["step"] < total_steps:
        save(params, opt_state)
  finally:
    if bar is not None:
      bar.close()
  tail = losses[-max(1, len(losses) // 10):] if losses else []
  state["losses"].append(float(np.mean(tail)) if tail else None)
  return params, opt_state


def _boundary_inputs(config: RunConfig, model: Any, params: Any, p: Prepared, stage: list[int],
                     stages: list[list[int]], si: int, it: BatchIterator) -> sched_lib.BoundaryInputs:
  """Calibration measurements for the boundary before stage ``si`` (current parameters)."""
  o = config.osft
  size = o.calibration_batch_size or config.training.batch_size
  model_io.update_model(model, params)

  def batches_of(split: EncodedSplit, seed: int) -> list[dict[str, Any]]:
    cal = BatchIterator(split, p.info, batch_size=min(size, len(split)), seed=seed, num_epochs=None)
    n = min(o.calibration_batches, cal.steps_per_epoch)
    return [cal.batch_at(0, s) for s in range(n)]

  source = stage[0] if (o.calibration_task == "new" or si == 0) else stages[si - 1][0]
  batches = batches_of(p.train_splits[source], config.training.seed + 1000 + si)
  covs = None
  if o.basis_source == "activations" and si > 0:
    prev = p.train_splits[stages[si - 1][0]]
    try:
      covs = covariance.matrix_input_covariances(model, batches_of(prev, config.training.seed + 2000 + si))
    except NotImplementedError as e:
      raise ConfigError(f"osft.basis_source: {e}") from None
  return sched_lib.BoundaryInputs(
      hidden_states=lambda b: model_io.block_hidden_states(model, b),
      token_masks=model_io.token_mask_for_stack, importance_batches=batches, covariances=covs)


def _results(config: RunConfig, p: Prepared, state: Mapping[str, Any], scheduler: Any,
             policy_counts: Mapping[str, int], policy_record: Mapping[str, Any]) -> dict[str, Any]:
  method = get_method(config.method)
  r = state["R"]
  totals = state.get("totals") or [len(s) for s in p.eval_splits]
  summary = metrics_lib.summarize(r, baseline=state["baseline"], correct_last=state["counts"][-1], total=totals)
  sched = scheduler.to_dict() if scheduler is not None else {"records": []}
  ranks = [rec["ranks"] for rec in sched["records"]]
  return {
    "name": config.name or config.method,
    "method": config.method,
    "tasks": p.names,
    "row_names": [_stage_name(p.names, s) for s in method.stages(len(p.names))],
    "R": r,
    "R_initial": state["baseline"],
    **summary,
    "correct": state["counts"],
    "eval_sizes": totals,
    "ranks": ranks,
    "invariant": state["invariant"],
    "invariant_max": metrics_lib.invariant_max(state["invariant"], config.osft.sides),
    "scheduler": sched,
    "param_policy_counts": dict(policy_counts),
    "param_policy": dict(policy_record),
    "precision": {"load_dtype": config.model.dtype, "param_dtype": np.dtype(model_io.MASTER_DTYPE).name,
                  "compute_dtype": "bfloat16" if config.training.bf16_compute else "float32"},
    "option_rate": state.get("option_rates", []),
    "option_rate_initial": state.get("baseline_option_rate"),
    "predictions": ([outputs.prediction_file(None)] if state["baseline"] is not None else [])
                   + [outputs.prediction_file(row) for row in
                      [_stage_name(p.names, s) for s in method.stages(len(p.names))][:len(r)]],
    "train_loss": state["losses"],
    "global_steps": state["global_step"],
    "train_tokens": state["tokens"],
    "train_seconds": state["train_seconds"],
    "eval_seconds": state["eval_seconds"],
    "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
    "model_config": model_io.model_config_dict(p.model),
    "config": config.to_dict(),
  }
