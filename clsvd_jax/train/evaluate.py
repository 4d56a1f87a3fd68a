"""Evaluation: batched greedy generation with the KV cache and exact match after normalisation (docs/design.md §9)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clsvd_jax.data.batching import eval_batches
from clsvd_jax.data.normalize import exact_match, normalize_answer
from clsvd_jax.data.tokenize import EncodedSplit, TokenizerInfo
from clsvd_jax.parallel import distributed
from clsvd_jax.train import model_io
from clsvd_jax.train.metrics import option_rate, option_set


@dataclasses.dataclass
class TaskEval:
  """The result of evaluating one task.

  Attributes:
    task: the task's name.
    correct: answers equal to the target after normalisation (exact match).
    total: examples evaluated.
    predictions: the generated answers, in evaluation order.
    targets: the gold answers.
    indices: each example's index in its source split (the prompt id of the predictions file).
    labels: the task's label words (``None`` for a free-form task).
  """

  task: str
  correct: int
  total: int
  predictions: list[str]
  targets: list[str]
  indices: list[int] = dataclasses.field(default_factory=list)
  labels: tuple[str, ...] | None = None

  @property
  def accuracy(self) -> float:
    return self.correct / self.total if self.total else 0.0

  @property
  def option_rate(self) -> float | None:
    """Share of answers that are one of the task's labels (``metrics.option_rate``); None for a free-form task."""
    return option_rate(self.predictions, self.labels)

  def records(self) -> list[dict[str, Any]]:
    """One dict per example: ``task``, ``id``, ``prediction``, ``label``, ``correct``, ``in_options``."""
    options = option_set(self.labels)
    ids = self.indices or list(range(len(self.predictions)))
    return [{"task": self.task, "id": int(i), "prediction": p, "label": t, "correct": exact_match(p, t),
             "in_options": None if options is None else normalize_answer(p) in options}
            for i, p, t in zip(ids, self.predictions, self.targets)]


def decode_new_tokens(tokenizer: Any, ids: np.ndarray, eos_id: int) -> list[str]:
  """Text of each row of generated ids, cut at the first end token."""
  out = []
  for row in np.asarray(ids):
    stop = np.flatnonzero(row == eos_id)
    row = row[:stop[0]] if stop.size else row
    out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
  return out


def evaluate_split(model: Any, data: EncodedSplit, tokenizer: Any, info: TokenizerInfo, *, batch_size: int,
                   max_new_tokens: int, progress: Any = None, labels: Sequence[str] | None = None) -> TaskEval:
  """Generates an answer for every example of ``data`` and scores it by normalised exact match.

  The model's current parameters are used (write new ones with ``model_io.update_model`` first).

  Args:
    model: the model.
    data: an encoded evaluation split.
    tokenizer: decodes the generated ids.
    info: special ids (EOS ends an answer).
    batch_size: rows per generation batch (the last batch is padded with filler rows, ignored here).
    max_new_tokens: generated tokens per example.
    progress: an optional tqdm bar, advanced by the number of real rows.
    labels: the task's label words, for the option rate (None: a free-form task).
  """
  correct, total, preds, targets, indices = 0, 0, [], [], []
  for batch in eval_batches(data, info, batch_size=batch_size):
    new = model_io.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                            eos_token_id=info.eos_id)
    # to_host: on a mesh over several processes the generated rows may live on other hosts' devices.
    texts = decode_new_tokens(tokenizer, distributed.to_host(new), info.eos_id)
    for text, target, w, index in zip(texts, batch["targets"], batch["weights"], batch["index"]):
      if w <= 0:
        continue
      preds.append(text)
      targets.append(target)
      indices.append(int(index))
      correct += int(exact_match(text, target))
      total += 1
    if progress is not None:
      progress.update(int(np.sum(batch["weights"] > 0)))
  return TaskEval(task=data.name, correct=correct, total=total, predictions=preds, targets=targets,
                  indices=indices, labels=tuple(labels) if labels is not None else None)


def evaluate_all(model: Any, params: Mapping[str, Any], splits: Sequence[EncodedSplit], tokenizer: Any,
                 info: TokenizerInfo, *, batch_size: int, max_new_tokens: int, names: Sequence[str],
                 progress_desc: str | None = None, show_progress: bool = False,
                 labels: Sequence[Sequence[str] | None] | None = None) -> list[TaskEval]:
  """Writes ``params`` into the model and evaluates every split (one per task, in stream order).

  ``labels`` holds each task's label words (for the option rate); None: unknown for every task.
  """
  model_io.update_model(model, params)
  bar = None
  if show_progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(s) for s in splits), desc=progress_desc or "eval", unit="ex", leave=False)
  try:
    out = []
    labels = list(labels) if labels is not None else [None] * len(splits)
    if len(labels) != len(splits):
      raise ValueError(f"evaluate_all: {len(labels)} label sets for {len(splits)} tasks")
    for name, split, task_labels in zip(names, splits, labels):
      res = evaluate_split(model, split, tokenizer, info, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=bar, labels=task_labels)
      res.task = name
      out.append(res)
    return out
  finally:
    if bar is not None:
      bar.close()
