"""Fixed-shape numpy batches: bucketed lengths, deterministic shuffling, per-host slices, resumable position.

Shapes: every batch has the global batch size split evenly over hosts (a partial last batch is filled with copies
of a real row whose ``weights`` and ``loss_mask`` are zero), and its length axis is padded to the smallest bucket
that fits the longest row of the *global* batch, so all hosts agree on the shape and a jitted step compiles once
per bucket (``bucket_lengths``: powers of two from ``min_length`` up to the maximum).

Batch keys (numpy arrays, ids int32, masks int32, ``loss_mask`` and ``weights`` float32):
  * decoder-only training: ``input_ids, attention_mask, loss_mask, weights`` [B, T] / [B]; rows are LEFT padded;
    ``loss_mask[b, t] = 1`` where ``input_ids[b, t]`` is a target token (the answer and its EOS), so the loss of
    position t is read from the logits at t - 1: ``loss_mask[:, 1:]`` against ``logits[:, :-1]``.
  * encoder-decoder training: ``input_ids, attention_mask`` [B, S] (right padded), ``decoder_input_ids,
    decoder_attention_mask, labels, loss_mask`` [B, T] with ``labels = target + EOS`` and ``decoder_input_ids``
    its shift right behind the decoder start id; ``loss_mask`` marks the real label positions; ``weights`` [B].
  * evaluation: ``input_ids, attention_mask, weights, index`` (example index, -1 for filler rows) plus the lists
    ``prompts``, ``targets`` and ``tasks`` (strings, filler rows ``""``). Decoder-only inputs are left padded
    prompts (BOS included) for generation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from clsvd_jax.data.tokenize import EncodedExample, EncodedSplit, TokenizerInfo


def bucket_lengths(max_length: int, min_length: int = 16) -> tuple[int, ...]:
  """Powers of two from ``min_length`` (rounded up) below ``max_length``, then ``max_length`` itself.

  >>> bucket_lengths(100, 16)
  (16, 32, 64, 100)
  """
  if max_length < 1:
    raise ValueError(f"bucket_lengths: max_length must be positive, got {max_length}")
  b = 1 << max(0, math.ceil(math.log2(max(1, min_length))))
  out = []
  while b < max_length:
    out.append(b)
    b *= 2
  out.append(max_length)
  return tuple(out)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds ``length``.

  Raises:
    ValueError: when ``length`` exceeds the largest bucket (the tokeniser's max_length and the buckets disagree).
  """
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"a row of {length} tokens exceeds the largest bucket {max(buckets)}; encode with the same "
                   "max_length as the buckets")


def _rows_for_host(rows: list[Any], batch_size: int, process_index: int, process_count: int) -> list[Any]:
  per_host = batch_size // process_count
  return rows[process_index * per_host:(process_index + 1) * per_host]


def collate(examples: Sequence[EncodedExample | None], info: TokenizerInfo, *, kind: str, train: bool,
            length: int, target_length: int | None = None, filler: EncodedExample | None = None) -> dict[str, Any]:
  """Pads one batch of examples into arrays; ``None`` entries are filler rows (weights 0).

  Args:
    examples: the rows; ``None`` rows become copies of ``filler`` (default: the first real row) with weight 0,
      so no row is all padding, which keeps attention softmaxes finite.
    info: special ids.
    kind: ``decoder`` or ``encoder_decoder``.
    train: training layout (prompt + target) or evaluation layout (prompt only, with the strings).
    length: padded length of ``input_ids``.
    target_length: encoder-decoder training: padded length of the decoder arrays.
    filler: the example copied into filler rows (hosts pass their global batch's first row, so that the host
      slices concatenate to exactly the global batch).
  """
  real = filler if filler is not None else next((e for e in examples if e is not None), None)
  if real is None:
    raise ValueError("collate: a batch needs at least one real example or a filler")
  b = len(examples)
  weights = np.array([e is not None for e in examples], np.float32)
  rows = [e if e is not None else real for e in examples]
  ids = np.full((b, length), info.pad_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  out: dict[str, Any] = {}
  if kind == "decoder":
    loss = np.zeros((b, length), np.float32)
    for i, e in enumerate(rows):
      seq = np.concatenate([e.prompt_ids, e.target_ids]) if train else e.prompt_ids
      n = len(seq)
      if n > length:
        raise ValueError(f"collate: row of {n} tokens does not fit length {length}")
      ids[i, length - n:] = seq
      mask[i, length - n:] = 1
      if train and weights[i]:
        loss[i, length - len(e.target_ids):] = 1.0
    out.update(input_ids=ids, attention_mask=mask)
    if train:
      out["loss_mask"] = loss
  else:
    for i, e in enumerate(rows):
      n = len(e.prompt_ids)
      if n > length:
        raise ValueError(f"collate: encoder row of {n} tokens does not fit length {length}")
      ids[i, :n] = e.prompt_ids
      mask[i, :n] = 1
    out.update(input_ids=ids, attention_mask=mask)
    if train:
      t_len = target_length or max(len(e.target_ids) for e in rows)
      labels = np.full((b, t_len), info.pad_id, np.int32)
      dec_in = np.full((b, t_len), info.pad_id, np.int32)
      dec_mask = np.zeros((b, t_len), np.int32)
      for i, e in enumerate(rows):
        t = len(e.target_ids)
        if t > t_len:
          raise ValueError(f"collate: target of {t} tokens does not fit length {t_len}")
        labels[i, :t] = e.target_ids
        dec_in[i, 0] = info.decoder_start_id
        dec_in[i, 1:t] = e.target_ids[:t - 1]
        dec_mask[i, :t] = 1
      out.update(decoder_input_ids=dec_in, decoder_attention_mask=dec_mask, labels=labels,
                 loss_mask=dec_mask.astype(np.float32) * weights[:, None])
  out["weights"] = weights
  if not train:
    out["index"] = np.array([e.index if e is not None else -1 for e in examples], np.int32)
    out["prompts"] = [e.prompt if e is not None else "" for e in examples]
    out["targets"] = [e.target if e is not None else "" for e in examples]
    out["tasks"] = [e.task if e is not None else "" for e in examples]
  return out


@dataclasses.dataclass(frozen=True)
class Position:
  """Where an iterator stands: the next batch is ``step`` of ``epoch``. Saved in checkpoints."""

  epoch: int = 0
  step: int = 0

  def to_dict(self) -> dict[str, int]:
    return {"epoch": self.epoch, "step": self.step}

  @classmethod
  def from_dict(cls, d: dict[str, int] | Position | None) -> Position:
    if d is None:
      return cls()
    if isinstance(d, Position):
      return d
    return cls(epoch=int(d["epoch"]), step=int(d["step"]))


class BatchIterator:
  """Deterministic, resumable, host-sharded iterator over fixed-size training batches of one ``EncodedSplit``.

  Epoch ``e`` visits the examples in the order ``permutation(seed, e)``; ``batch_at(e, s)`` is a pure function
  of its arguments, so a run restarted from a saved ``position`` yields exactly the batches it had left.

  Args:
    data: the encoded split.
    info: special ids (``tokenizer_info``).
    batch_size: the GLOBAL batch size; each host gets ``batch_size // process_count`` rows.
    seed: shuffling seed.
    shuffle: shuffle per epoch (else file order).
    num_epochs: stop after this many epochs (``None``: never stop).
    buckets: length buckets for ``input_ids`` (default ``bucket_lengths(data.max_length)``).
    target_buckets: encoder-decoder label buckets (default ``bucket_lengths(data.max_target_length, 8)``).
    process_index, process_count: this host and the number of hosts.
    drop_remainder: drop the last partial batch of an epoch instead of filling it with weight-0 rows.
    position: where to start (a ``Position`` or its dict).
  """

  def __init__(self, data: EncodedSplit, info: TokenizerInfo, *, batch_size: int, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None, buckets: Sequence[int] | None = None,
               target_buckets: Sequence[int] | None = None, process_index: int = 0, process_count: int = 1,
               drop_remainder: bool = False, position: dict[str, int] | Position | None = None):
    _check_hosts(batch_size, process_index, process_count)
    if not len(data):
      raise ValueError(f"BatchIterator: {data.name or 'split'} has no examples")
    if drop_remainder and len(data) < batch_size:
      raise ValueError(f"BatchIterator: drop_remainder with {len(data)} examples < batch_size {batch_size} gives no "
                       "batch")
    self.data, self.info = data, info
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
    self.process_index, self.process_count = process_index, process_count
    self.buckets = tuple(buckets) if buckets is not None else bucket_lengths(data.max_length)
    self.target_buckets = (tuple(target_buckets) if target_buckets is not None
                           else bucket_lengths(data.max_target_length, 8))
    self._position = Position.from_dict(position)
    self._perm_cache: tuple[int, np.ndarray] | None = None

  @property
  def steps_per_epoch(self) -> int:
    n = len(self.data)
    return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

  @property
  def position(self) -> Position:
    """The position of the next batch (save ``position.to_dict()`` in a checkpoint)."""
    return self._position

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch`` (the same on every host)."""
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      n = len(self.data)
      perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      self._perm_cache = (epoch, perm)
    return self._perm_cache[1]

  def batch_at(self, epoch: int, step: int) -> dict[str, Any]:
    """This host's slice of global batch ``step`` of ``epoch``."""
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f"step {step} outside the {self.steps_per_epoch} steps of an epoch")
    return self.collate_global(self.global_examples(epoch, step))

  def global_examples(self, epoch: int, step: int) -> list[EncodedExample | None]:
    """The rows of global batch ``step`` of ``epoch`` (``None``: a filler row), the same on every host.

    Subclasses that draw rows differently (e.g. mixing in a replay memory) override this and ``steps_per_epoch``.
    """
    perm = self.permutation(epoch)
    rows = perm[step * self.batch_size:(step + 1) * self.batch_size].tolist()
    ex = self.data.examples
    return [ex[r] for r in rows] + [None] * (self.batch_size - len(rows))

  def collate_global(self, examples: Sequence[EncodedExample | None]) -> dict[str, Any]:
    """Pads this host's share of a global batch; the bucket follows the longest row of the whole global batch."""
    real = [e for e in examples if e is not None]
    kind = self.data.kind
    if kind == "decoder":
      length, t_len = pick_bucket(max(e.length for e in real), self.buckets), None
    else:
      length = pick_bucket(max(len(e.prompt_ids) for e in real), self.buckets)
      t_len = pick_bucket(max(len(e.target_ids) for e in real), self.target_buckets)
    mine = _rows_for_host(list(examples), self.batch_size, self.process_index, self.process_count)
    return collate(mine, self.info, kind=kind, train=True, length=length, target_length=t_len, filler=real[0])

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    pos = self._position
    if self.num_epochs is not None and pos.epoch >= self.num_epochs:
      raise StopIteration
    batch = self.batch_at(pos.epoch, pos.step)
    step = pos.step + 1
    self._position = Position(pos.epoch + 1, 0) if step >= self.steps_per_epoch else Position(pos.epoch, step)
    return batch

  def set_position(self, position: dict[str, int] | Position) -> None:
    """Moves to a saved position (resume)."""
    self._position = Position.from_dict(position)

  def shapes(self) -> set[tuple[tuple[str, tuple[int, ...]], ...]]:
    """The distinct array shapes one epoch produces (how many times a jitted step compiles)."""
    out = set()
    for s in range(self.steps_per_epoch):
      b = self.batch_at(0, s)
      out.add(tuple(sorted((k, v.shape) for k, v in b.items() if isinstance(v, np.ndarray))))
    return out


def _check_hosts(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")


def eval_batches(data: EncodedSplit, info: TokenizerInfo, *, batch_size: int, buckets: Sequence[int] | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, Any]]:
  """Evaluation batches in file order: left-padded (decoder-only) or right-padded (encoder-decoder) prompts.

  Every host gets the same number of batches; filler rows have ``weights`` 0 and ``index`` -1.
  """
  _check_hosts(batch_size, process_index, process_count)
  buckets = tuple(buckets) if buckets is not None else bucket_lengths(data.max_length)
  ex = data.examples
  for start in range(0, len(ex), batch_size):
    rows = list(range(start, min(start + batch_size, len(ex))))
    rows += [-1] * (batch_size - len(rows))
    length = pick_bucket(max(len(ex[r].prompt_ids) for r in rows if r >= 0), buckets)
    mine = [ex[r] if r >= 0 else None for r in _rows_for_host(rows, batch_size, process_index, process_count)]
    yield collate(mine, info, kind=data.kind, train=False, length=length, filler=ex[start])
