"""Phase 3b, train a task: the optimizer steps of one stage, without the host waiting on the device.

Each step is dispatched with its batch (an explicit host-to-device copy) and the device-side ``StepCarry`` (step
count, first non-finite step); its metrics stay on the device in a ring. Every ``training.log_every`` steps, before
every checkpoint and at the end of the task, one fetch brings the ring to the host: the loss sums and token counts
of ``RunState``, TensorBoard, the progress bar, and the non-finite check. A non-finite step changes nothing (nor
does any step after it), so the fetch that finds one raises ``TrainingError`` naming that step and the last
checkpoint, which no bad step has touched: checkpoints are only written right after a clean fetch.

At the end of the task the mean loss of its last tenth of steps is the task's ``train_loss``; a task that
diverged (``run_state.divergence``: a step larger than the weights, or a loss that rose 1.5-fold to above chance)
is recorded with a warning.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from clsvd_jax.data import BatchIterator, EncodedSplit
from clsvd_jax.parallel import distributed
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.run_state import RunState, TrainState, divergence

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext


class TrainingError(RuntimeError):
  """The run stopped: a non-finite loss or gradient. The message names the step and the last good checkpoint."""


def between_fetches() -> contextlib.AbstractContextManager[None]:
  """The context every step is dispatched in (tests put ``jax.transfer_guard("disallow")`` here: no implicit
  transfer may happen between two fetches)."""
  return contextlib.nullcontext()


def fetch(tree: Any) -> Any:
  """The one device-to-host transfer of the loop (a function, so tests can count the calls)."""
  return jax.device_get(tree)


def train_iterator(ctx: RunContext, si: int, position: dict[str, int] | None) -> BatchIterator:
  """The training batches of stage ``si`` from ``position`` (this host's rows of each batch)."""
  p, stage, tcfg = ctx.prepared, ctx.stages[si], ctx.config.training
  data = p.train_splits[stage[0]] if len(stage) == 1 else EncodedSplit.concat(
      [p.train_splits[i] for i in stage], name=ctx.stage_name(si))
  index, count = ctx.layout.host_split
  return BatchIterator(data, p.info, batch_size=tcfg.batch_size, seed=tcfg.seed + si, num_epochs=None,
                       position=position, process_index=index, process_count=count)


def steps_for(ctx: RunContext, it: BatchIterator) -> int:
  """Optimizer steps of a stage: ``steps_per_task``, else ``epochs`` passes over its data."""
  t = ctx.config.training
  return t.steps_per_task if t.steps_per_task is not None else t.epochs * it.steps_per_epoch


def train_task(ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
  """The optimizer steps of stage ``state.stage`` from ``state.step`` on; leaves the run at phase ``eval``.

  Raises:
    TrainingError: a step was not finite (at the fetch that saw it; nothing is saved after it).
    RunInterrupted: the step budget of this call is spent (tests).
  """
  si = state.stage
  it = ctx.hooks.train_batches(ctx, state) if ctx.hooks is not None else train_iterator(ctx, si, state.position)
  total = steps_for(ctx, it)
  if state.step == 0:
    # One jitted program, not one eager program per leaf: on several processes each eager reduction is a
    # collective program of its own, and a stream of them in flight deadlocked the CPU collectives (2 threads, 4
    # devices per process; test_train_two_processes). to_host gathers a result spread over processes.
    state.task_stats.param_norm = float(distributed.to_host(_global_norm(arrays.params)))
  loop = _Loop(ctx, state, arrays, total)
  with loop.progress_bar():
    while state.step < total:
      ctx.budget.take()
      ctx.watchdog.beat(f"step {state.step + 1}/{total} of {ctx.stage_label(si)}")
      loop.dispatch(next(it))
      state.position = it.position.to_dict()
      ckpt_due = bool(ctx.config.training.checkpoint_every) and (
          state.global_step % ctx.config.training.checkpoint_every == 0) and state.step < total
      if ckpt_due or loop.log_due() or state.step == total:
        loop.fetch_metrics()
      if ckpt_due:
        ctx.save(state, loop.arrays())
        loop.restart_clock()  # training throughput leaves the save out
  _finish_task(ctx, state, total)
  return loop.arrays()


_global_norm = jax.jit(optax.global_norm)


@jax.jit
def _stack(ring: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """The ring's metrics as one array per name (one device program, then one transfer per name)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *ring)


class _Loop:
  """The training loop's device values between fetches: the arrays, the carry and the ring of step metrics."""

  def __init__(self, ctx: RunContext, state: RunState, arrays: TrainState, total: int):
    self.ctx, self.state, self.total = ctx, state, total
    self.step = ctx.step.for_task(step_lib.Schedule.of(ctx.config.optimizer, total))
    self.params, self.opt_state = ctx.layout.place_state(arrays.params, arrays.opt_state)
    self._rest = arrays
    self.carry = ctx.layout.put_replicated(step_lib.start_carry(state.step))
    # The method's step input (EWC's state, LoRA's base weights): fixed for the task, already on the devices.
    self.aux = ctx.hooks.step_input(arrays) if ctx.hooks is not None else None
    self.ring: list[dict[str, jax.Array]] = []
    self._clock = time.perf_counter()
    self._bar: Any = None

  def arrays(self) -> TrainState:
    return self._rest._replace(params=self.params, opt_state=self.opt_state)

  def restart_clock(self) -> None:
    self._clock = time.perf_counter()

  def dispatch(self, host_batch: dict[str, Any]) -> None:
    with between_fetches():
      batch = self.ctx.layout.put_batch(host_batch)
      self.params, self.opt_state, self.carry, metrics = self.step(self.params, self.opt_state, batch, self.carry,
                                                                   self.aux)
    self.ring.append(metrics)
    self.state.step += 1
    self.state.global_step += 1

  def log_due(self) -> bool:
    every = self.ctx.config.training.log_every
    return bool(every) and self.state.step % every == 0

  def fetch_metrics(self) -> None:
    """Brings the ring to the host: loss sums, tokens, logs; raises ``TrainingError`` on a non-finite step."""
    ctx, state = self.ctx, self.state
    ctx.watchdog.beat()
    host, first_bad = fetch((_stack(self.ring), self.carry.first_bad))
    n = len(self.ring)
    first = state.step - n  # the task step of the ring's first entry
    if int(first_bad) >= 0:
      self._raise_non_finite(host, int(first_bad) - first, int(first_bad))
    now = time.perf_counter()
    seconds = now - self._clock
    self._clock = now
    global0 = state.global_step - n
    for i in range(n):
      loss = float(host["loss"][i])
      state.task_stats.add(first + i, self.total, loss, float(host["update_norm"][i]))
      ctx.writer.scalar("train/loss", loss, global0 + i + 1)
    seen = float(host["seen"].sum())
    state.tokens += float(host["tokens"].sum())
    state.seen_tokens += seen
    state.train_seconds += seconds
    tok_s = seen / max(seconds, 1e-9)
    ctx.writer.scalar("train/tokens_per_s", tok_s, state.global_step)
    ctx.writer.scalar("train/lr", float(host["lr"][-1]), state.global_step)
    if "penalty" in host:
      ctx.writer.scalar("train/penalty", float(host["penalty"][-1]), state.global_step)
    if self._bar is not None:
      self._bar.update(n)
      self._bar.set_postfix(loss=f"{float(host['loss'][-1]):.4f}", tok_s=f"{tok_s:.0f}")
    self.ring = []
    ctx.watchdog.beat()

  def _raise_non_finite(self, host: dict[str, Any], i: int, task_step: int) -> None:
    ctx, state = self.ctx, self.state
    global_step = state.global_step - state.step + task_step + 1
    raise TrainingError(
        f"non-finite loss ({float(host['loss'][i])}), gradient norm ({float(host['grad_norm'][i])}) or update "
        f"norm ({float(host['update_norm'][i])}) at step {task_step + 1} of task {state.stage + 1} "
        f"({ctx.stage_name(state.stage)}), global step {global_step}; the run stopped and nothing was saved after "
        f"it: {ctx.checkpoints.describe('the last good checkpoint')}. Lower "
        "optimizer.lr, set optimizer.clip_norm, or try training.bf16_compute: false; then rerun with --resume")

  @contextlib.contextmanager
  def progress_bar(self) -> Iterator[None]:
    if self.ctx.config.training.progress and self.ctx.main:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=self.total, initial=self.state.step, desc=f"task {self.state.stage + 1}/"
                       f"{self.ctx.num_stages} {self.ctx.stage_name(self.state.stage)}", unit="step", leave=False)
    try:
      yield
    finally:
      if self._bar is not None:
        self._bar.close()
        self._bar = None


def _finish_task(ctx: RunContext, state: RunState, total: int) -> None:
  """The task's train loss and divergence check; moves the run to its evaluation phase."""
  del total
  stats = state.task_stats
  state.losses.append(stats.tail)
  why = divergence(stats, getattr(ctx.prepared.model.config, "vocab_size", None))
  if why is not None:
    name = ctx.stage_name(state.stage)
    state.diverged.append(name)
    ctx.say(f"warning: task {state.stage + 1} ({name}) diverged: {why}; lower optimizer.lr")
  state.phase = "eval"
