"""Tokenisation of prompts and targets for both model kinds, with counted (never fatal) truncation.

Token layout (ids in the tokenizer's vocabulary):
  * ``decoder`` (decoder-only, e.g. LLaMA): ``prompt_ids = [BOS] + prompt``, ``target_ids = target + [EOS]``; a
    training sequence is ``prompt_ids + target_ids`` and must fit ``max_length``. BOS is added when the tokenizer
    has one and adds it itself (``add_bos=None``), or as forced by ``add_bos``.
  * ``encoder_decoder`` (e.g. T5): ``prompt_ids = prompt + [EOS]`` (what T5 tokenizers produce) must fit
    ``max_length``; ``target_ids = target + [EOS]`` must fit ``max_target_length``.

Prompt and target are tokenised separately, without special tokens, so the loss mask falls exactly on the target.
A prompt that does not fit loses part of its *sentence* only (``Task.truncation_side``: ``left`` drops the start
of the sentence, ``right`` its end); the instruction, options and the closing ``Answer:`` cue always survive.
Every truncation is counted in the returned ``EncodedSplit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from clsvd_jax.data import prompts
from clsvd_jax.data.tasks import DataError, Example, Task

KINDS = ("decoder", "encoder_decoder")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """The special ids batching needs.

  Attributes:
    pad_id: id written into padding positions (masked everywhere).
    eos_id: end-of-sequence id, appended to every target (and to encoder inputs).
    bos_id: id prepended to decoder-only prompts, or ``None`` for none.
    decoder_start_id: first decoder input of encoder-decoder models (T5: the pad id).
  """

  pad_id: int
  eos_id: int
  bos_id: int | None
  decoder_start_id: int


def tokenizer_info(tokenizer: Any, kind: str, *, add_bos: bool | None = None,
                   decoder_start_id: int | None = None) -> TokenizerInfo:
  """Reads the special ids of a Hugging Face tokenizer.

  Args:
    tokenizer: any ``transformers`` tokenizer.
    kind: ``decoder`` or ``encoder_decoder``.
    add_bos: decoder-only: prepend BOS. ``None`` follows the tokenizer (its ``add_bos_token`` flag when it has
      one, else whether it defines a BOS token).
    decoder_start_id: encoder-decoder: the decoder start id; defaults to the pad id (T5's convention).

  Raises:
    DataError: unknown kind, or a tokenizer without an EOS token.
  """
  if kind not in KINDS:
    raise DataError(f"model kind {kind!r}: expected one of {', '.join(KINDS)}")
  eos = tokenizer.eos_token_id
  if eos is None:
    raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token; targets must end with EOS so greedy "
                    "decoding stops (set tokenizer.eos_token)")
  pad = tokenizer.pad_token_id
  pad = eos if pad is None else pad  # LLaMA tokenizers have no pad token; padding is masked anyway
  bos = None
  if kind == "decoder":
    if add_bos is None:
      add_bos = bool(getattr(tokenizer, "add_bos_token", tokenizer.bos_token_id is not None))
    if add_bos:
      if tokenizer.bos_token_id is None:
        raise DataError(f"add_bos=True but tokenizer {type(tokenizer).__name__} has no bos_token")
      bos = int(tokenizer.bos_token_id)
  start = pad if decoder_start_id is None else decoder_start_id
  return TokenizerInfo(pad_id=int(pad), eos_id=int(eos), bos_id=bos, decoder_start_id=int(start))


@dataclasses.dataclass(frozen=True)
class EncodedExample:
  """One tokenised example (see the module docstring for the layout)."""

  prompt_ids: np.ndarray
  target_ids: np.ndarray
  prompt: str
  target: str
  index: int
  task: str
  truncated: bool = False

  @property
  def length(self) -> int:
    """Length of the decoder-only training sequence."""
    return len(self.prompt_ids) + len(self.target_ids)


@dataclasses.dataclass
class EncodedSplit:
  """The tokenised examples of one split (or of several tasks, for multi-task training) and truncation counts."""

  kind: str
  examples: list[EncodedExample]
  max_length: int
  max_target_length: int
  truncated_prompts: int = 0
  truncated_targets: int = 0
  name: str = ""

  def __len__(self) -> int:
    return len(self.examples)

  def report(self) -> str:
    """One line for the log: how many prompts / targets were cut to fit."""
    return (f"{self.name or 'data'}: {len(self.examples)} examples, {self.truncated_prompts} prompts truncated to fit "
            f"max_length={self.max_length}, {self.truncated_targets} targets truncated to "
            f"max_target_length={self.max_target_length}")

  @classmethod
  def concat(cls, splits: Sequence[EncodedSplit], name: str = "mixed") -> EncodedSplit:
    """All examples of several splits (same kind), e.g. every task at once for multi-task training."""
    if not splits:
      raise ValueError("EncodedSplit.concat: no splits")
    kinds = {s.kind for s in splits}
    if len(kinds) != 1:
      raise ValueError(f"EncodedSplit.concat: mixed model kinds {sorted(kinds)}")
    return cls(kind=splits[0].kind, examples=[e for s in splits for e in s.examples],
               max_length=max(s.max_length for s in splits),
               max_target_length=max(s.max_target_length for s in splits),
               truncated_prompts=sum(s.truncated_prompts for s in splits),
               truncated_targets=sum(s.truncated_targets for s in splits), name=name)


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
  if not texts:
    return []
  return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _fit_prompt(tokenizer: Any, head: str, sentence: str, tail: str, budget: int, side: str) -> tuple[str, list[int]]:
  """Cuts the sentence until ``head + sentence + tail`` tokenises to at most ``budget`` tokens."""
  s_ids = _ids(tokenizer, [sentence])[0]
  fixed = len(_ids(tokenizer, [head + tail])[0])
  keep = min(len(s_ids), budget - fixed)
  ids: list[int] = []
  text = head + tail
  # Re-tokenising the joined text can merge differently at the seams; shrink until it fits (few rounds).
  for _ in range(16):
    if keep <= 0:
      text, ids = head + tail, _ids(tokenizer, [head + tail])[0]
      break
    kept = s_ids[len(s_ids) - keep:] if side == "left" else s_ids[:keep]
    text = head + tokenizer.decode(kept, skip_special_tokens=True) + tail
    ids = _ids(tokenizer, [text])[0]
    if len(ids) <= budget:
      break
    keep -= len(ids) - budget
  if len(ids) > budget:  # only when the seams keep merging: cut tokens of the text outright
    ids = ids[len(ids) - budget:] if side == "left" else ids[:budget]
    text = tokenizer.decode(ids, skip_special_tokens=True)
  return text, ids


def encode_examples(task: Task, examples: Sequence[Example], tokenizer: Any, *, kind: str, max_length: int,
                    max_target_length: int | None = None, add_bos: bool | None = None,
                    split: str = "") -> EncodedSplit:
  """Tokenises the examples of one task.

  Args:
    task: the resolved task (template, group, options).
    examples: its examples.
    tokenizer: a Hugging Face tokenizer (tests use ``transformers.ByT5Tokenizer()``).
    kind: ``decoder`` or ``encoder_decoder``.
    max_length: decoder-only: the longest training sequence (BOS + prompt + target + EOS); encoder-decoder: the
      longest encoder input (prompt + EOS).
    max_target_length: the longest target including EOS (default: ``max_length // 4``, at least 8).
    add_bos: see ``tokenizer_info``.
    split: a name for ``EncodedSplit.report``.

  Returns:
    An ``EncodedSplit``; over-long prompts are cut in their sentence and counted, over-long targets cut and counted.

  Raises:
    DataError: when the prompt without any sentence does not fit (a config problem: raise ``max_length`` or
      shorten the template / instruction).
  """
  info = tokenizer_info(tokenizer, kind, add_bos=add_bos)
  if max_target_length is None:
    max_target_length = max(8, max_length // 4)
  if max_target_length < 2:
    raise DataError(f"max_target_length={max_target_length}: needs room for at least one token and EOS")
  head, tail = prompts.prompt_parts(task)
  prefix = [info.bos_id] if info.bos_id is not None else []
  suffix = [info.eos_id] if kind == "encoder_decoder" else []
  texts = [head + ex.sentence + tail for ex in examples]
  prompt_ids = _ids(tokenizer, texts)
  target_ids = _ids(tokenizer, [ex.answer for ex in examples])
  out, cut_prompts, cut_targets = [], 0, 0
  for ex, text, p_ids, t_ids in zip(examples, texts, prompt_ids, target_ids):
    if len(t_ids) + 1 > max_target_length:
      t_ids, cut_targets = t_ids[:max_target_length - 1], cut_targets + 1
    t_ids = t_ids + [info.eos_id]
    budget = max_length - len(prefix) - len(suffix) - (len(t_ids) if kind == "decoder" else 0)
    truncated = len(p_ids) > budget
    if truncated:
      fixed = len(_ids(tokenizer, [head + tail])[0])
      if fixed > budget:
        raise DataError(f"task '{task.name}': the prompt without its sentence takes {fixed} tokens but max_length="
                        f"{max_length} leaves {budget} (after special tokens and the {len(t_ids)}-token target); "
                        "raise max_length or shorten the template / instruction")
      text, p_ids = _fit_prompt(tokenizer, head, ex.sentence, tail, budget, task.truncation_side)
      cut_prompts += 1
    out.append(EncodedExample(prompt_ids=np.asarray(prefix + p_ids + suffix, np.int32),
                              target_ids=np.asarray(t_ids, np.int32), prompt=text, target=ex.answer, index=ex.index,
                              task=task.name, truncated=truncated))
  return EncodedSplit(kind=kind, examples=out, max_length=max_length, max_target_length=max_target_length,
                      truncated_prompts=cut_prompts, truncated_targets=cut_targets,
                      name=f"{task.name}/{split}" if split else task.name)


def encode_task(data: Any, tokenizer: Any, *, kind: str, max_length: int, max_target_length: int | None = None,
                add_bos: bool | None = None) -> tuple[EncodedSplit, EncodedSplit]:
  """Tokenises the training and evaluation examples of a loaded ``TaskData``."""
  kw = dict(kind=kind, max_length=max_length, max_target_length=max_target_length, add_bos=add_bos)
  train = encode_examples(data.task, data.train, tokenizer, split=data.task.splits["train"], **kw)
  evals = encode_examples(data.task, data.eval, tokenizer, split=data.task.splits["eval"], **kw)
  return train, evals
