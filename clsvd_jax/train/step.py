"""The optimizer of a run and its train step: one pure function, jitted once per configuration by JAX.

The step is ``step(params, opt_state, batch, carry, aux) -> (params, opt_state, carry, metrics)``:

* the loss is the mean cross entropy over target tokens only (``loss_mask``), weighted by tokens, so a batch
  split into ``grad_accum`` micro-batches (a ``lax.scan``) gives exactly the gradient of the whole batch;
* ``bf16_compute`` casts the parameters to bfloat16 for the forward and backward pass, while the master weights,
  the gradient sum and the optimizer state stay float32;
* the learning rate is an optax schedule of the step count in ``carry`` (restarted at every task): AdamW runs with
  learning rate 1 and the final update is scaled by the schedule's value, the same as ``adamw(schedule)`` because
  every projection is linear. Nothing but the batch comes from the host, nothing goes back to it: the runner
  fetches the metrics of several steps at once (``train_loop``);
* a non-finite loss, gradient or update leaves params and optimizer state unchanged, and so does every step after
  it; ``carry.first_bad`` records the first such step on the device, so the runner stops at its next fetch with the
  last good state intact;
* a method may change the loss (``LossTerms``): ``params`` are then what the optimizer trains (e.g. LoRA adapters)
  and ``model_params(params, aux)`` what the model sees, and ``penalty(params, aux, opt_state)`` (e.g. EWC's
  quadratic) is added once per step, not per micro-batch. ``aux`` is the method's state (the EWC anchors, the frozen
  base weights): a step argument, so it changes between tasks without recompiling; None for full fine-tuning.

``TrainStep`` is the jitted form: a hashable description of everything the step closes over, passed as a static
argument to one module-level ``jax.jit``, so JAX's own cache compiles a configuration once per process (runs of
the same config, a resume in the same process, tasks of the same length) and a new one when anything differs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clsvd_jax as cj
from clsvd_jax.config import OptimizerConfig, OsftConfig, ParamPolicyConfig, RunConfig
from clsvd_jax.data.tasks import DataError
from clsvd_jax.train.methods import get_method

# Keys of a training batch that enter the loss (the rest are bookkeeping).
TRAIN_KEYS = {
  "encoder_decoder": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels",
                      "loss_mask"),
  "decoder": ("input_ids", "attention_mask", "loss_mask"),
}


# Why each default of the parameters outside the constrained matrices (recorded in results.json).
_FULL_FINE_TUNING = ("method {method} constrains nothing: full fine-tuning, every parameter trains (the constrain "
                     "patterns included)")
_RANDOM_INIT = ("osft on a model built from model.config (random weights): the matrices are constrained and every "
                "other parameter (embeddings, lm_head, norms, relative-position bias) trains freely; frozen random "
                "embeddings and head leave a from-scratch model unable to learn")
_PRETRAINED = ("osft on a pretrained checkpoint (model.path): the matrices are constrained and every other parameter "
               "(embeddings, lm_head, norms, relative-position bias) is frozen, the paper's setting")


@dataclasses.dataclass(frozen=True)
class RunPolicy:
  """The parameter policy in force for a run and why (``resolve_param_policy``).

  Attributes:
    policy: the resolved rules (``default`` is never ``auto``).
    reason: one sentence: which default applied, or that the config set it.
  """

  policy: cj.ParamPolicy
  reason: str

  def to_dict(self, params: Any = None) -> dict[str, Any]:
    """For results.json: rules, default, reason, and (given ``params``) the action of every parameter path."""
    out = self.policy.to_dict() | {"reason": self.reason}
    if params is not None:
      out["labels"] = cj.flatten_with_paths(self.policy.labels(params))
    return out


def param_policy(cfg: ParamPolicyConfig, *, constrained: bool = True, pretrained: bool = True) -> cj.ParamPolicy:
  """The ``clsvd_jax.ParamPolicy`` of the config section (see ``ParamPolicyConfig`` for ``default: auto``).

  Args:
    cfg: the ``osft.param_policy`` section.
    constrained: whether the method constrains (``osft``); an unconstrained method trains its matrices freely.
    pretrained: whether the model comes from a checkpoint (else it was built with random weights).
  """
  return resolve_param_policy(cfg, constrained=constrained, pretrained=pretrained).policy


def policy_of_run(config: RunConfig) -> RunPolicy:
  """The policy in force for a run: its method (``Method.constrained``) and its model's start (``model.path``:
  a pretrained checkpoint; ``model.config``: random weights)."""
  return resolve_param_policy(config.osft.param_policy, constrained=get_method(config.method).constrained,
                          pretrained=config.model.path is not None, method=config.method)


def resolve_param_policy(cfg: ParamPolicyConfig, *, constrained: bool, pretrained: bool,
                     method: str = "osft") -> RunPolicy:
  """Resolves ``default: auto`` for a method and a model start (docs/design.md §6), with the reason for results.json.

  Args:
    cfg: the ``osft.param_policy`` section.
    constrained: whether the method constrains (``Method.constrained``).
    pretrained: ``model.path`` is set (a checkpoint) rather than ``model.config`` (random weights).
    method: the method's name, for the reason.
  """
  constrain = tuple(cfg.constrain) if cfg.constrain is not None else cj.DEFAULT_CONSTRAIN
  freeze, train = tuple(cfg.freeze), tuple(cfg.train)
  if not constrained:
    # Nothing is constrained, so the matrices are trained parameters like any other (and counted as such).
    train, constrain = train + constrain, ()
  if cfg.default != "auto":
    # Under a method that constrains nothing, 'constrain' is plain training too.
    default = "train" if cfg.default == "constrain" and not constrained else cfg.default
    reason = f"osft.param_policy.default: {cfg.default} (set in the config)"
  elif not constrained:
    default, reason = "train", _FULL_FINE_TUNING.format(method=method)
  elif pretrained:
    default, reason = "freeze", _PRETRAINED
  else:
    default, reason = "train", _RANDOM_INIT
  if freeze or cfg.train:
    reason += f"; explicit rules: freeze {list(freeze)}, train {list(cfg.train)}"
  policy = cj.ParamPolicy.from_config(constrain=constrain, freeze=freeze, train=train, default=default)
  return RunPolicy(policy, reason)


def _adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
  # Learning rate 1: the step scales the final update by the scheduled lr (see the module docstring).
  return optax.adamw(1.0, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(opt: OptimizerConfig, osft: OsftConfig, *, constrained: bool,
                    policy: cj.ParamPolicy | None = None) -> optax.GradientTransformation:
  """AdamW under the parameter policy: constrained matrices get ``clsvd_jax.constrained(adamw)`` (when the method
  is constrained; plain AdamW otherwise), ``train`` parameters plain AdamW, frozen ones a zero update.

  Args:
    opt: the optimizer section.
    osft: the osft section (projection options; its ``param_policy`` when ``policy`` is not given).
    constrained: whether the method constrains.
    policy: the run's resolved policy (``policy_of_run``); default: ``param_policy(osft.param_policy)`` (the
      labels of a constrained method on a checkpoint; an unconstrained method then trains its matrices with
      plain AdamW under the same labels).
  """
  policy = policy if policy is not None else param_policy(osft.param_policy)
  if constrained:
    matrices = cj.constrained(_adamw(opt), sides=osft.sides, project_gradients=osft.project_gradients,
                              max_rank_ratio=osft.max_rank_ratio)
  else:
    matrices = _adamw(opt)
  return policy.partition(matrices, train=_adamw(opt))


def check_policy(params: Any, policy: cj.ParamPolicy | OsftConfig) -> dict[str, int]:
  """Counts parameters per action and refuses a policy that trains nothing.

  Args:
    params: the parameters.
    policy: the run's resolved policy (an ``OsftConfig`` reads its ``param_policy`` with the pretrained default).

  Raises:
    DataError: naming the config key, when no parameter is constrained or trained.
  """
  if isinstance(policy, OsftConfig):
    policy = param_policy(policy.param_policy)
  labels = cj.flatten_with_paths(policy.labels(params))
  counts = {a: sum(1 for v in labels.values() if v == a) for a in ("constrain", "freeze", "train")}
  if counts["constrain"] + counts["train"] == 0:
    raise DataError(f"osft.param_policy: no parameter is constrained or trained (paths include "
                    f"{list(labels)[:4]}); fix the regexes in osft.param_policy.constrain / train")
  return counts


class Schedule(NamedTuple):
  """The learning-rate schedule of one task (hashable: part of the jitted step's static description).

  Attributes:
    peak: the configured learning rate.
    warmup_steps: linear warm-up steps at the start of the task.
    kind: ``constant``, ``linear`` or ``cosine`` (the decay after warm-up).
    total_steps: the task's optimizer steps (0 for ``constant``, whose values do not depend on it, so tasks of
      different lengths share one compiled step).
  """

  peak: float
  warmup_steps: int
  kind: str
  total_steps: int

  @classmethod
  def of(cls, cfg: OptimizerConfig, total_steps: int) -> Schedule:
    return cls(float(cfg.lr), int(cfg.warmup_steps), cfg.schedule,
               0 if cfg.schedule == "constant" else int(total_steps))


def lr_schedule(s: Schedule) -> optax.Schedule:
  """The optax schedule of ``s``: step ``c`` (0-based) of the warm-up gets ``peak (c + 1) / warmup_steps``, then
  ``constant`` stays at ``peak`` while ``linear`` and ``cosine`` decay to 0 at the task's last step."""
  w = s.warmup_steps
  if s.kind == "constant":
    after = optax.constant_schedule(s.peak)
  else:
    span = max(s.total_steps - w, 1)
    after = (optax.linear_schedule(s.peak, 0.0, span) if s.kind == "linear"
             else optax.cosine_decay_schedule(s.peak, span))
  if w <= 0:
    return after
  # Step c of the warm-up trains with (c + 1) / w of the peak: the first step already moves.
  warmup = optax.linear_schedule(s.peak / w, s.peak, max(w - 1, 1)) if w > 1 else optax.constant_schedule(s.peak)
  return optax.join_schedules([warmup, after], [w])


def learning_rate(step: int, total: int, cfg: OptimizerConfig) -> float:
  """The learning rate of optimizer step ``step`` (0-based) of a task with ``total`` steps (host-side view of
  ``lr_schedule``, for tables and tests)."""
  return float(lr_schedule(Schedule.of(cfg, total))(step))


def token_losses(apply_fn: Callable[..., Any], params: Any, batch: Mapping[str, Any], kind: str
                 ) -> tuple[jax.Array, jax.Array]:
  """Summed cross entropy over target tokens and the number of target tokens of one batch."""
  if kind == "encoder_decoder":
    logits = apply_fn(params, batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                      batch["decoder_attention_mask"])
    targets, mask = batch["labels"], batch["loss_mask"]
  else:
    # Position t predicts token t + 1; loss_mask marks target tokens in input_ids.
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])[:, :-1]
    targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def seen_tokens(batch: Mapping[str, Any], kind: str) -> jax.Array:
  """Input + target tokens of the real rows of a batch (filler rows, with no target, do not count).

  Decoder-only inputs already hold prompt and target; an encoder-decoder reads the prompt in the encoder and the
  target in the decoder.
  """
  mask = batch["loss_mask"].astype(jnp.float32)
  real = (jnp.sum(mask, axis=-1, keepdims=True) > 0).astype(jnp.float32)
  total = jnp.sum(batch["attention_mask"].astype(jnp.float32) * real)
  return total + jnp.sum(mask) if kind == "encoder_decoder" else total


def _cast_floating(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class StepCarry(NamedTuple):
  """Device scalars threaded from step to step within a task.

  Attributes:
    step: optimizer steps done in the task (the schedule's count).
    first_bad: the 0-based step of the task whose loss, gradient or update was not finite, -1 while none was.
  """

  step: jax.Array
  first_bad: jax.Array


def start_carry(step: int = 0) -> StepCarry:
  """The carry of a task that has done ``step`` steps (host values: ``jax.device_put`` it where it runs)."""
  return StepCarry(np.int32(step), np.int32(-1))


@dataclasses.dataclass(frozen=True)
class LossTerms:
  """What a method changes in the training loss (``clsvd_jax.train.hooks``); None fields change nothing.

  Attributes:
    model_params: ``(params, aux) -> model parameters``: what the model is applied with (LoRA: the frozen base plus
      the adapters ``params``). None: ``params`` themselves.
    penalty: ``(params, aux, opt_state) -> scalar`` added to the mean token loss once per optimizer step (EWC,
      O-LoRA). None: no penalty.
  """

  model_params: Callable[[Any, Any], Any] | None = None
  penalty: Callable[[Any, Any, Any], jax.Array] | None = None


def make_train_step(apply_fn: Callable[..., Any], tx: optax.GradientTransformation, *, kind: str,
                    schedule: optax.Schedule, grad_accum: int = 1, bf16_compute: bool = False,
                    clip_norm: float | None = None, trainable: Any = None,
                    loss_terms: LossTerms | None = None) -> Callable[..., Any]:
  """The pure train step (see the module docstring).

  Args:
    apply_fn: the model's pure apply function (``clsvd_jax.models.functional``).
    tx: the optimizer (``build_optimizer``); its learning rate must be 1 (the step scales by ``schedule``).
    kind: ``encoder_decoder`` or ``decoder``.
    schedule: the learning rate as a function of ``carry.step``.
    grad_accum: micro-batches per step; the batch's leading axis must be divisible by it.
    bf16_compute: forward/backward in bfloat16.
    clip_norm: clip the global norm of the trainable gradients (None: no clipping).
    trainable: a pytree of bools like params (frozen leaves get no gradient in the norm); None = all.
    loss_terms: the method's changes to the loss (None: the token loss of ``params`` alone).

  Returns:
    ``step(params, opt_state, batch, carry, aux=None) -> (params, opt_state, carry, metrics)`` with metrics
    ``loss`` (mean per target token, without the penalty), ``tokens`` (target tokens), ``seen`` (input + target
    tokens), ``lr``, ``grad_norm``, ``update_norm``, ``finite`` and, with a penalty, ``penalty``.
  """
  keys = TRAIN_KEYS[kind]
  terms = loss_terms or LossTerms()

  def loss_sum(params: Any, aux: Any, micro: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    p = terms.model_params(params, aux) if terms.model_params is not None else params
    p = _cast_floating(p, jnp.bfloat16) if bf16_compute else p
    total, count = token_losses(apply_fn, p, micro, kind)
    return total, count

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(params: Any, opt_state: Any, batch: Mapping[str, Any], carry: StepCarry, aux: Any = None):
    batch = {k: batch[k] for k in keys}
    if grad_accum == 1:
      (total, count), grads = grad_fn(params, aux, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

      def body(acc, mb):
        g_sum, t_sum, c_sum = acc
        (t, c), g = grad_fn(params, aux, mb)
        g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
        return (g_sum, t_sum + t, c_sum + c), None

      (grads, total, count), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grads, params)
    extra = {}
    if terms.penalty is not None:
      pen, pen_grads = jax.value_and_grad(terms.penalty)(params, aux, opt_state)
      grads = jax.tree.map(lambda g, q: (g.astype(jnp.float32) + q.astype(jnp.float32)).astype(g.dtype), grads,
                           pen_grads)
      extra["penalty"] = pen
    if trainable is not None:
      grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    grad_norm = optax.global_norm(grads)
    if clip_norm is not None:
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-12))
      grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    loss = total / denom
    lr = jnp.asarray(schedule(carry.step), jnp.float32)
    updates, new_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (u * lr).astype(u.dtype), updates)
    update_norm = optax.global_norm(updates)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    if "penalty" in extra:
      finite = finite & jnp.isfinite(extra["penalty"])
    # A bad step changes nothing, nor does any step after it: the runner stops at its next fetch of the metrics
    # with the state of the last good step.
    ok = finite & (carry.first_bad < 0)
    keep = lambda new, old: jnp.where(ok, new, old)
    new_params = jax.tree.map(keep, new_params, params)
    new_state = jax.tree.map(keep, new_state, opt_state)
    first_bad = jnp.where((carry.first_bad < 0) & ~finite, carry.step, carry.first_bad).astype(jnp.int32)
    carry = StepCarry((carry.step + 1).astype(jnp.int32), first_bad)
    metrics = {"loss": loss, "tokens": count, "seen": seen_tokens(batch, kind), "lr": lr, "grad_norm": grad_norm,
               "update_norm": update_norm, "finite": finite} | extra
    return new_params, new_state, carry, metrics

  return step


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The jitted train step of a run: call it as ``step(params, opt_state, batch, carry, aux)``.

  Equality and hash (what JAX's cache keys the compiled program on) are ``key``, ``schedule`` and
  ``schedule_fn``; the other fields are derived from them. ``key`` must therefore describe everything the step
  closes over: ``context.step_key`` builds it from the whole config minus what cannot change the step, so a
  new config field changes the key by default.

  Attributes:
    key: a digest of the config, the model, the parameter labels and the mesh.
    schedule: this task's learning-rate schedule.
    schedule_fn: builds the optax schedule from ``schedule`` (``lr_schedule``).
    apply_fn, tx, kind, grad_accum, bf16_compute, clip_norm, trainable, loss_terms: as ``make_train_step``
      (``key`` must cover the method's options that ``loss_terms`` closes over).
    shardings: ``(param_shardings, opt_state_shardings, replicated)`` on a mesh: the outputs are laid out as the
      inputs, so consecutive steps feed each other without a copy or a recompile. None on one device.
  """

  key: str
  schedule: Schedule
  schedule_fn: Callable[[Schedule], optax.Schedule]
  apply_fn: Callable[..., Any] = dataclasses.field(compare=False)
  tx: optax.GradientTransformation = dataclasses.field(compare=False)
  kind: str = dataclasses.field(compare=False)
  grad_accum: int = dataclasses.field(compare=False, default=1)
  bf16_compute: bool = dataclasses.field(compare=False, default=False)
  clip_norm: float | None = dataclasses.field(compare=False, default=None)
  trainable: Any = dataclasses.field(compare=False, default=None)
  shardings: tuple[Any, Any, Any] | None = dataclasses.field(compare=False, default=None)
  loss_terms: LossTerms | None = dataclasses.field(compare=False, default=None)

  def for_task(self, schedule: Schedule) -> TrainStep:
    """The same step with another task's schedule."""
    return dataclasses.replace(self, schedule=schedule)

  def __call__(self, params: Any, opt_state: Any, batch: Mapping[str, Any], carry: StepCarry, aux: Any = None
               ) -> tuple[Any, Any, StepCarry, dict[str, jax.Array]]:
    return _jitted_step(self, params, opt_state, batch, carry, aux)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _jitted_step(spec: TrainStep, params: Any, opt_state: Any, batch: Mapping[str, Any], carry: StepCarry,
                 aux: Any = None):
  step = make_train_step(spec.apply_fn, spec.tx, kind=spec.kind, schedule=spec.schedule_fn(spec.schedule),
                         grad_accum=spec.grad_accum, bf16_compute=spec.bf16_compute, clip_norm=spec.clip_norm,
                         trainable=spec.trainable, loss_terms=spec.loss_terms)
  params, opt_state, carry, metrics = step(params, opt_state, batch, carry, aux)
  if spec.shardings is not None:
    p_sh, o_sh, repl = spec.shardings
    params = jax.lax.with_sharding_constraint(params, p_sh)
    opt_state = jax.lax.with_sharding_constraint(opt_state, o_sh)
    carry, metrics = jax.lax.with_sharding_constraint((carry, metrics), repl)
  return params, opt_state, carry, metrics
