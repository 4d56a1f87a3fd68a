"""Rank classification: score every label option of a classification task by the model's likelihood, pick the best.

Exact match on generated answers mixes two things: whether the model knows the answer and whether it still writes
it in the expected form. Rank classification asks only the first: for each example and each label option y (its
tokens followed by EOS, as training targets end), the score is the summed log-likelihood ``sum_t log p(y_t | x,
y_<t)`` under teacher forcing, and the prediction is the option with the highest score. A model that answers
"Goood" for "Good" fails exact match but may still rank "Good" first.

Layout of the scored sequences (the same as training, ``clsvd_jax.data.batching``):
  * decoder-only: the left-padded prompt followed by the option's tokens and right padding; positions count real
    tokens only, so the option continues the prompt exactly as in training;
  * encoder-decoder: the prompt is the encoder input; the option is the decoder's labels, shifted right behind the
    decoder start id.

The likelihood of each row is the training loss of that row (``clsvd_jax.train.step.token_losses``, negated), so
scoring and training can never disagree on which position predicts which token. All options of a batch are scored
in one jitted call (vmapped over options).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax.data.batching import eval_batches
from clsvd_jax.data.tokenize import EncodedSplit, TokenizerInfo
from clsvd_jax.train.step import token_losses

Scorer = Callable[[Any, Any, Any, Any, Any], jax.Array]


class OptionSet(NamedTuple):
  """The label options of a task as token ids.

  Attributes:
    labels: the option strings, in the task's order.
    ids: int32 ``[K, To]``: each option's tokens (then EOS when included), right-padded.
    mask: int32 ``[K, To]``: 1 on the option's tokens.
  """

  labels: tuple[str, ...]
  ids: np.ndarray
  mask: np.ndarray


def encode_options(tokenizer: Any, labels: Sequence[str], info: TokenizerInfo, *,
                   include_eos: bool = True) -> OptionSet:
  """Tokenises label options the way targets are tokenised (no special tokens, then EOS).

  Args:
    tokenizer: the run's tokenizer.
    labels: the option strings.
    info: special ids (EOS, padding).
    include_eos: score the end token too, i.e. the likelihood of answering exactly the option and stopping (a
      label that is a prefix of another, e.g. "positive" and "positive review", is then not favoured).

  Raises:
    ValueError: for no labels or a label that tokenises to nothing.
  """
  labels = tuple(labels)
  if not labels:
    raise ValueError("rank classification needs at least one label option")
  rows = [list(x) for x in tokenizer(list(labels), add_special_tokens=False)["input_ids"]]
  empty = [lab for lab, r in zip(labels, rows) if not r]
  if empty:
    raise ValueError(f"label options {empty} tokenise to no tokens; rank classification cannot score them")
  rows = [r + [info.eos_id] if include_eos else r for r in rows]
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), info.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for k, r in enumerate(rows):
    ids[k, :len(r)] = r
    mask[k, :len(r)] = 1
  return OptionSet(labels, ids, mask)


def _row_log_likelihoods(apply_fn: Callable[..., Any], params: Any, batch: Mapping[str, jax.Array],
                         kind: str) -> jax.Array:
  """``[B]``: each row's summed log-likelihood of its ``loss_mask`` tokens (minus the training loss of the row)."""
  one = lambda row: -token_losses(apply_fn, params, jax.tree.map(lambda x: x[None], row), kind)[0]
  return jax.vmap(one)(dict(batch))


def make_option_scorer(apply_fn: Callable[..., Any], *, kind: str, decoder_start_id: int = 0) -> Scorer:
  """A jitted ``score(params, input_ids, attention_mask, option_ids, option_mask) -> [B, K]`` of summed option
  log-likelihoods, for evaluation batches (``clsvd_jax.data.eval_batches``: left-padded decoder-only prompts,
  right-padded encoder inputs).

  Args:
    apply_fn: the model's pure apply function (``clsvd_jax.models.functional``).
    kind: ``decoder`` or ``encoder_decoder``.
    decoder_start_id: the first decoder input of encoder-decoder models (``TokenizerInfo.decoder_start_id``).
  """
  if kind not in ("decoder", "encoder_decoder"):
    raise ValueError(f"rank classification: unknown model kind {kind!r}")

  def one_option(params, input_ids, attention_mask, opt_ids, opt_mask):
    b = input_ids.shape[0]
    tile = lambda x: jnp.broadcast_to(x[None], (b,) + x.shape)
    ids, mask = tile(opt_ids), tile(opt_mask)
    if kind == "decoder":
      batch = {"input_ids": jnp.concatenate([input_ids, ids], 1),
               "attention_mask": jnp.concatenate([attention_mask, mask], 1),
               "loss_mask": jnp.concatenate([jnp.zeros_like(attention_mask), mask], 1).astype(jnp.float32)}
    else:
      start = jnp.full((b, 1), decoder_start_id, ids.dtype)
      batch = {"input_ids": input_ids, "attention_mask": attention_mask,
               "decoder_input_ids": jnp.concatenate([start, ids[:, :-1]], 1), "decoder_attention_mask": mask,
               "labels": ids, "loss_mask": mask.astype(jnp.float32)}
    return _row_log_likelihoods(apply_fn, params, batch, kind)

  @jax.jit
  def score(params, input_ids, attention_mask, option_ids, option_mask):
    per_option = jax.vmap(one_option, in_axes=(None, None, None, 0, 0))(
        params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
        jnp.asarray(option_ids, jnp.int32), jnp.asarray(option_mask, jnp.int32))
    return per_option.T  # [B, K]

  return score


@dataclasses.dataclass
class RankEval:
  """Rank-classification result of one task: per-example predicted option and its scores."""

  task: str
  correct: int
  total: int
  predictions: list[str]
  targets: list[str]
  scores: np.ndarray

  @property
  def accuracy(self) -> float:
    return self.correct / self.total if self.total else 0.0


def rank_classify_split(scorer: Scorer, params: Any, data: EncodedSplit, options: OptionSet, info: TokenizerInfo,
                        *, batch_size: int) -> RankEval:
  """Scores every example of an evaluation split on every option; correct when the best option is its target.

  Raises:
    ValueError: when a target is not one of the options (rank classification is for tasks with a label set).
  """
  labels = {lab: k for k, lab in enumerate(options.labels)}
  unknown = sorted({e.target for e in data.examples} - set(labels))
  if unknown:
    raise ValueError(f"task '{data.name}': targets {unknown[:5]} are not label options {list(options.labels)}; "
                     "rank classification needs the task's label set")
  preds, targets, scores, correct = [], [], [], 0
  for batch in eval_batches(data, info, batch_size=batch_size):
    s = np.asarray(scorer(params, batch["input_ids"], batch["attention_mask"], options.ids, options.mask))
    for row, target, w in zip(s, batch["targets"], batch["weights"]):
      if w <= 0:
        continue
      best = int(np.argmax(row))
      preds.append(options.labels[best])
      targets.append(target)
      scores.append(row)
      correct += int(best == labels[target])
  return RankEval(task=data.name, correct=correct, total=len(preds), predictions=preds, targets=targets,
                  scores=np.asarray(scores, np.float32).reshape(len(preds), len(options.labels)))
