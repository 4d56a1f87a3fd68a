"""Evaluation: batched greedy generation with the KV cache and exact match after normalisation (DESIGN 9)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clsvd_jax.data.batching import eval_batches
from clsvd_jax.data.normalize import exact_match
from clsvd_jax.data.tokenize import EncodedSplit, TokenizerInfo
from clsvd_jax.parallel import distributed
from clsvd_jax.train import model_io


@dataclasses.dataclass
class TaskEval:
  """The result of evaluating one task."""

  task: str
  correct: int
  total: int
  predictions: list[str]
  targets: list[str]

  @property
  def accuracy(self) -> float:
    return self.correct / self.total if self.total else 0.0


def decode_new_tokens(tokenizer: Any, ids: np.ndarray, eos_id: int) -> list[str]:
  """Text of each row of generated ids, cut at the first end token."""
  out = []
  for row in np.asarray(ids):
    stop = np.flatnonzero(row == eos_id)
    row = row[:stop[0]] if stop.size else row
    out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
  return out


def evaluate_split(model: Any, data: EncodedSplit, tokenizer: Any, info: TokenizerInfo, *, batch_size: int,
                   max_new_tokens: int, progress: Any = None) -> TaskEval:
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
  """
  correct, total, preds, targets = 0, 0, [], []
  for batch in eval_batches(data, info, batch_size=batch_size):
    new = model_io.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                            eos_token_id=info.eos_id)
    # to_host: on a mesh over several processes the generated rows may live on other hosts' devices.
    texts = decode_new_tokens(tokenizer, distributed.to_host(new), info.eos_id)
    for text, target, w in zip(texts, batch["targets"], batch["weights"]):
      if w <= 0:
        continue
      preds.append(text)
      targets.append(target)
      correct += int(exact_match(text, target))
      total += 1
    if progress is not None:
      progress.update(int(np.sum(batch["weights"] > 0)))
  return TaskEval(task=data.name, correct=correct, total=total, predictions=preds, targets=targets)


def evaluate_all(model: Any, params: Mapping[str, Any], splits: Sequence[EncodedSplit], tokenizer: Any,
                 info: TokenizerInfo, *, batch_size: int, max_new_tokens: int, names: Sequence[str],
                 progress_desc: str | None = None, show_progress: bool = False) -> list[TaskEval]:
  """Writes ``params`` into the model and evaluates every split (one per task, in stream order)."""
  model_io.update_model(model, params)
  bar = None
  if show_progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(s) for s in splits), desc=progress_desc or "eval", unit="ex", leave=False)
  try:
    out = []
    for name, split in zip(names, splits):
      res = evaluate_split(model, split, tokenizer, info, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=bar)
      res.task = name
      out.append(res)
    return out
  finally:
    if bar is not None:
      bar.close()
