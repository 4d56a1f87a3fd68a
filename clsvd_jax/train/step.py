"""The optimizer of a run and its jitted train step.

The step is a pure function ``step(params, opt_state, batch, lr) -> (params, opt_state, metrics)``:

* the loss is the mean cross entropy over target tokens only (``loss_mask``), weighted by tokens, so a batch
  split into ``grad_accum`` micro-batches (a ``lax.scan``) gives exactly the gradient of the whole batch;
* ``bf16_compute`` casts the parameters to bfloat16 for the forward and backward pass, while the master weights,
  the gradient sum and the optimizer state stay float32;
* the learning rate is an argument (a traced scalar), so the per-task schedule is computed on the host and the
  step compiles once per batch shape. AdamW runs with learning rate 1 and the final update is scaled by ``lr``:
  the same as ``adamw(lr)`` because every projection is linear;
* a non-finite loss, gradient or update leaves params and optimizer state unchanged and reports
  ``finite = False``, so the runner can stop with the last good state intact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clsvd_jax as cj
from clsvd_jax.config import OptimizerConfig, OsftConfig, ParamPolicyConfig, RunConfig
from clsvd_jax.data.tasks import DataError
from clsvd_jax.train.methods import get_method

StepFn = Callable[[Any, Any, Mapping[str, Any], Any], tuple[Any, Any, dict[str, Any]]]

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
  """Resolves ``default: auto`` for a method and a model start (DESIGN 6), with the reason for results.json.

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


def learning_rate(step: int, total: int, cfg: OptimizerConfig) -> float:
  """The learning rate of optimizer step ``step`` (0-based) of a task with ``total`` steps."""
  if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
    return cfg.lr * (step + 1) / cfg.warmup_steps
  if cfg.schedule == "constant":
    return cfg.lr
  span = max(total - cfg.warmup_steps, 1)
  frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
  if cfg.schedule == "linear":
    return cfg.lr * (1.0 - frac)
  return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


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


def _cast_floating(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(apply_fn: Callable[..., Any], tx: optax.GradientTransformation, *, kind: str,
                    grad_accum: int = 1, bf16_compute: bool = False, clip_norm: float | None = None,
                    trainable: Any = None) -> StepFn:
  """The pure train step (see the module docstring).

  Args:
    apply_fn: the model's pure apply function (``clsvd_jax.models.functional``).
    tx: the optimizer (``build_optimizer``).
    kind: ``encoder_decoder`` or ``decoder``.
    grad_accum: micro-batches per step; the batch's leading axis must be divisible by it.
    bf16_compute: forward/backward in bfloat16.
    clip_norm: clip the global norm of the trainable gradients (None: no clipping).
    trainable: a pytree of bools like params (frozen leaves get no gradient in the norm); None = all.

  Returns:
    ``step(params, opt_state, batch, lr) -> (params, opt_state, metrics)`` with metrics ``loss`` (mean per target
    token), ``tokens``, ``grad_norm``, ``update_norm`` and ``finite``.
  """
  keys = TRAIN_KEYS[kind]

  def loss_sum(params: Any, micro: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    p = _cast_floating(params, jnp.bfloat16) if bf16_compute else params
    total, count = token_losses(apply_fn, p, micro, kind)
    return total, count

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(params: Any, opt_state: Any, batch: Mapping[str, Any], lr: Any):
    batch = {k: batch[k] for k in keys}
    if grad_accum == 1:
      (total, count), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

      def body(carry, mb):
        g_sum, t_sum, c_sum = carry
        (t, c), g = grad_fn(params, mb)
        g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
        return (g_sum, t_sum + t, c_sum + c), None

      (grads, total, count), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grads, params)
    if trainable is not None:
      grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    grad_norm = optax.global_norm(grads)
    if clip_norm is not None:
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-12))
      grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    loss = total / denom
    updates, new_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (u * lr).astype(u.dtype), updates)
    update_norm = optax.global_norm(updates)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    # A bad step changes nothing: the runner stops on `finite == False` with the last good state.
    keep = lambda new, old: jnp.where(finite, new, old)
    new_params = jax.tree.map(keep, new_params, params)
    new_state = jax.tree.map(keep, new_state, opt_state)
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "update_norm": update_norm, "finite": finite}
    return new_params, new_state, metrics

  return step


def jit_step(step: StepFn, *, donate: bool = True) -> StepFn:
  """``jax.jit`` with params and optimizer state donated (updated in place where the backend allows)."""
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def device_batch(batch: Mapping[str, Any], kind: str) -> dict[str, jax.Array]:
  """The arrays of a numpy training batch the step needs, as device arrays."""
  return {k: jnp.asarray(np.asarray(batch[k])) for k in TRAIN_KEYS[kind]}


@dataclasses.dataclass
class StepTimer:
  """Tokens per second over a sliding window of steps (for the progress bar and TensorBoard)."""

  window: int = 20
  _times: list[float] = dataclasses.field(default_factory=list)
  _tokens: list[float] = dataclasses.field(default_factory=list)

  def add(self, seconds: float, tokens: float) -> float:
    self._times.append(seconds)
    self._tokens.append(tokens)
    self._times, self._tokens = self._times[-self.window:], self._tokens[-self.window:]
    return sum(self._tokens) / max(sum(self._times), 1e-9)
