"""Which parameters are constrained, frozen or trained freely: regex rules over parameter paths (docs/design.md §6)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from clsvd_jax._src import tree_paths

CONSTRAIN, FREEZE, TRAIN = "constrain", "freeze", "train"
ACTIONS = (CONSTRAIN, FREEZE, TRAIN)

# Attention q/k/v/o (LLaMA names and T5 names, T5 cross-attention included) and the MLP matrices.
DEFAULT_CONSTRAIN = (
    r"(^|/)(self_attn|cross_attn)/(q|k|v|o|q_proj|k_proj|v_proj|o_proj)/weight$",
    r"(^|/)mlp/(gate_proj|up_proj|down_proj|wi|wi_0|wi_1|wo)/weight$",
)


@dataclasses.dataclass(frozen=True)
class ParamPolicy:
  """Ordered regex rules ``(pattern, action)``; the first rule whose pattern ``re.search``-es the path wins.

  Actions: ``constrain`` (the orthogonal-complement update; only matrices), ``freeze`` (zero update) and
  ``train`` (unconstrained update). Paths not matched by any rule get ``default`` (freeze unless told otherwise:
  the original code trained them freely, which is available but never the default).
  """

  rules: Sequence[tuple[str, str]] = tuple((p, CONSTRAIN) for p in DEFAULT_CONSTRAIN)
  default: str = FREEZE

  def __post_init__(self):
    for pattern, action in self.rules:
      if action not in ACTIONS:
        raise ValueError(f"parameter policy rule {pattern!r}: unknown action {action!r}; expected one of {ACTIONS}")
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"parameter policy rule {pattern!r} is not a valid regex: {e}") from None
    if self.default not in ACTIONS:
      raise ValueError(f"parameter policy default {self.default!r}: expected one of {ACTIONS}")

  @classmethod
  def from_config(cls, constrain: Sequence[str] = DEFAULT_CONSTRAIN, freeze: Sequence[str] = (),
                  train: Sequence[str] = (), default: str = FREEZE) -> ParamPolicy:
    """Builds a policy from per-action pattern lists (freeze rules first, then train, then constrain)."""
    rules = [(p, FREEZE) for p in freeze] + [(p, TRAIN) for p in train] + [(p, CONSTRAIN) for p in constrain]
    return cls(rules=tuple(rules), default=default)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly form (for results.json): the ordered ``rules`` and the ``default``."""
    return {"rules": [[pattern, action] for pattern, action in self.rules], "default": self.default}

  def action(self, path: str) -> str:
    """The action for one parameter path."""
    for pattern, action in self.rules:
      if re.search(pattern, path):
        return action
    return self.default

  def labels(self, params: Any) -> Any:
    """A pytree of action labels shaped like ``params``, for ``optax.partition``.

    Raises:
      ValueError: when a rule constrains a parameter that is not a matrix.
    """

    def one(path: str, p: Any) -> str:
      action = self.action(path)
      if action == CONSTRAIN and np.ndim(p) < 2:
        raise ValueError(f"parameter policy constrains {path!r} of shape {np.shape(p)}, but only matrices can be "
                         "constrained; add a freeze or train rule for it")
      return action

    return tree_paths.map_with_paths(one, params)

  def mask(self, params: Any, action: str = CONSTRAIN) -> Any:
    """A pytree of bools: which leaves get ``action`` (masked nodes of ``optax.partition`` count as False)."""
    if action not in ACTIONS:
      raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")

    def one(path: str, p: Any) -> bool:
      if isinstance(p, optax.MaskedNode):
        return False
      return self.action(path) == action

    return tree_paths.map_with_paths(one, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

  def partition(self, constrain: optax.GradientTransformation,
                train: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """``optax.partition`` over the three actions: frozen leaves get a zero update.

    Args:
      constrain: the transformation for constrained matrices (usually ``clsvd_jax.constrained(...)``).
      train: the transformation for freely trained leaves; required when any leaf is labelled ``train``.
    """
    transforms = {CONSTRAIN: constrain, FREEZE: optax.set_to_zero(),
                  TRAIN: train if train is not None else _missing_train_tx()}
    return optax.partition(transforms, self.labels)


def _missing_train_tx() -> optax.GradientTransformation:
  def init_fn(params: Any) -> optax.EmptyState:
    if jax.tree.leaves(params):
      raise ValueError("the parameter policy labels some parameters 'train' but no transformation was given for "
                       "them: pass train=optax.adamw(...) to ParamPolicy.partition")
    return optax.EmptyState()

  return optax.GradientTransformation(init_fn, lambda u, s, p=None: (u, s))

