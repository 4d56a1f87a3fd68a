"""Answer normalisation for exact match (docs/design.md §9): lower-case, strip punctuation, collapse whitespace."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def _is_punct(ch: str) -> bool:
  # Unicode punctuation (P*) and the ASCII symbols people use as punctuation ($, +, <, =, >, ^, `, |, ~).
  return unicodedata.category(ch).startswith("P") or ch in "$+<=>^`|~"


def normalize_answer(text: str) -> str:
  """Lower-cases, removes punctuation and collapses runs of whitespace to single spaces (stripped).

  >>> normalize_answer("  Science or   Technology.\\n")
  'science or technology'
  """
  text = "".join(" " if ch.isspace() else ch for ch in text.lower() if not _is_punct(ch))
  return " ".join(text.split())


def exact_match(prediction: str, target: str) -> bool:
  """Whether two answers are equal after ``normalize_answer``."""
  return normalize_answer(prediction) == normalize_answer(target)


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
  """Mean exact match over paired lists.

  Raises:
    ValueError: when the lists differ in length or are empty.
  """
  if len(predictions) != len(targets):
    raise ValueError(f"exact_match_accuracy: {len(predictions)} predictions for {len(targets)} targets")
  if not targets:
    raise ValueError("exact_match_accuracy: no examples")
  return sum(exact_match(p, t) for p, t in zip(predictions, targets)) / len(targets)
