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
from clsvd_jax.config import OptimizerConfig, OsftConfig, ParamPolicyConfig
from clsvd_jax.data.tasks import DataError

StepFn = Callable[[Any, Any, Mapping[str, Any], Any], tuple[Any, Any, dict[str, Any]]]

# Keys of a training batch that enter the loss (the rest are bookkeeping).
TRAIN_KEYS = {
  "encoder_decoder": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels",
                      "loss_mask"),
  "decoder": ("input_ids", "attention_mask", "loss_mask"),
}


def param_policy(cfg: ParamPolicyConfig) -> cj.ParamPolicy:
  """The ``clsvd_jax.ParamPolicy`` of the config (default: constrain attention + MLP, freeze the rest)."""
  constrain = tuple(cfg.constrain) if cfg.constrain is not None else cj.DEFAULT_CONSTRAIN
  return cj.ParamPolicy.from_config(constrain=constrain, freeze=tuple(cfg.freeze), train=tuple(cfg.train),
                                    default=cfg.default)


def _adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
  # Learning rate 1: the step scales the final update by the scheduled lr (see the module docstring).
  return optax.adamw(1.0, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(opt: OptimizerConfig, osft: OsftConfig, *, constrained: bool) -> optax.GradientTransformation:
  """AdamW under the parameter policy: constrained matrices get ``clsvd_jax.constrained(adamw)`` (when the method
  is constrained; plain AdamW otherwise), ``train`` parameters plain AdamW, frozen ones a zero update."""
  policy = param_policy(osft.param_policy)
  if constrained:
    matrices = cj.constrained(_adamw(opt), sides=osft.sides, project_gradients=osft.project_gradients,
                              max_rank_ratio=osft.max_rank_ratio)
  else:
    matrices = _adamw(opt)
  return policy.partition(matrices, train=_adamw(opt))


def check_policy(params: Any, osft: OsftConfig) -> dict[str, int]:
  """Counts parameters per action and refuses a policy that trains nothing.

  Raises:
    DataError: naming the config key, when no parameter is constrained or trained.
  """
  labels = cj.flatten_with_paths(param_policy(osft.param_policy).labels(params))
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
