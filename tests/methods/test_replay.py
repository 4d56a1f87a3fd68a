"""Replay: memory size, per-label balance, uniform reservoir draws, mixing ratio, determinism, exact resume and the
JSON round trip of the memory."""

import json

import jax
import numpy as np
import pytest

from clsvd_jax.data import BatchIterator, EncodedExample, EncodedSplit, TokenizerInfo
from clsvd_jax.methods import replay

INFO = TokenizerInfo(pad_id=0, eos_id=1, bos_id=None, decoder_start_id=0)


def _split(task: str, labels: list[str], seed: int = 0, kind: str = "decoder") -> EncodedSplit:
  rng = np.random.RandomState(seed)
  examples = []
  for i, label in enumerate(labels):
    prompt = rng.randint(3, 90, rng.randint(3, 12)).astype(np.int32)
    target = np.asarray([10 + ord(label[0]) % 50, INFO.eos_id], np.int32)
    examples.append(EncodedExample(prompt_ids=prompt, target_ids=target, prompt=f"{task} {i}", target=label,
                                   index=i, task=task))
  return EncodedSplit(kind=kind, examples=examples, max_length=32, max_target_length=8, name=task)


def _labels(counts: dict[str, int], seed: int = 0) -> list[str]:
  out = [k for k, n in counts.items() for _ in range(n)]
  np.random.RandomState(seed).shuffle(out)
  return out


def test_memory_size_and_reservoir_draws():
  big, small = _split("a", _labels({"x": 50})), _split("b", _labels({"y": 5}))
  opts = replay.ReplayOptions(memory_per_task=20)
  mem = replay.remember(replay.ReplayMemory(), 0, big, opts, seed=0)
  mem = replay.remember(mem, 1, small, opts, seed=0)
  assert len(mem) == 25 and len(mem.of_task(0)) == 20 and mem.of_task(1) == (0, 1, 2, 3, 4)
  kept = np.asarray(mem.of_task(0))
  assert len(set(kept.tolist())) == 20 and kept.min() >= 0 and kept.max() < 50 and np.all(np.diff(kept) > 0)
  # Rerunning the boundary of task 0 (e.g. after a resume) replaces its entries instead of adding them again.
  assert replay.remember(mem, 0, big, opts, seed=0) == replay.ReplayMemory(mem.tasks[20:] + mem.tasks[:20],
                                                                            mem.indices[20:] + mem.indices[:20])
  # Uniform: over many seeds every index of a 10-example split is kept about 3/10 of the time.
  hits = np.zeros(10)
  for s in range(300):
    hits[np.asarray(replay.select_reservoir(jax.random.key(s), 10, 3))] += 1
  assert hits.sum() == 900 and np.all(np.abs(hits - 90) < 30), hits


@pytest.mark.parametrize("size", [6, 10, 21, 40])
def test_per_label_balance(size):
  counts = {"x": 30, "y": 12, "z": 3}
  split = _split("a", _labels(counts))
  for seed in range(5):
    keep = replay.select(replay.ReplayOptions(memory_per_task=size, strategy="per_label"), split,
                         jax.random.key(seed))
    assert len(set(keep.tolist())) == len(keep) == min(size, 45)
    got = {k: sum(split.examples[i].target == k for i in keep) for k in counts}
    # Round robin: a label that ran out gave everything it has; the others differ by at most one.
    exhausted = [k for k in counts if got[k] == counts[k]]
    open_counts = [got[k] for k in counts if k not in exhausted]
    if open_counts:
      assert max(open_counts) - min(open_counts) <= 1, (size, got)
      assert all(got[k] <= min(open_counts) for k in exhausted), (size, got)
  # Reservoir draws follow the data instead: with 6 of 45, the rare label is usually missing.
  ids = replay.label_ids(split)
  assert sorted(set(ids.tolist())) == [0, 1, 2] and np.sum(ids == 2) == 3


def _memory_examples(seed=1):
  splits = [_split("a", _labels({"x": 9, "y": 9}), seed=seed), _split("b", _labels({"u": 7}), seed=seed + 1)]
  mem = replay.ReplayMemory()
  for t, s in enumerate(splits):
    mem = replay.remember(mem, t, s, replay.ReplayOptions(memory_per_task=4), seed=0)
  return splits, mem


def test_mixing_ratio_and_epoch_coverage():
  splits, mem = _memory_examples()
  current = _split("c", _labels({"p": 23, "q": 10}), seed=5)
  it = replay.ReplayBatchIterator(current, mem.examples(splits), INFO, batch_size=8, ratio=0.25, seed=3)
  assert it.memory_rows == 2 and it.current_rows == 6 and it.steps_per_epoch == 6  # ceil(33 / 6)
  seen = []
  for step in range(it.steps_per_epoch):
    rows = it.global_examples(0, step)
    assert len(rows) == 8
    replayed = [e for e in rows if e is not None and e.task != "c"]
    assert len(replayed) == 2 and len({(e.task, e.index) for e in replayed}) == 2
    seen += [e.index for e in rows if e is not None and e.task == "c"]
    batch = it.batch_at(0, step)
    # Memory rows are real rows of the collated batch: full weight and a loss on their targets.
    assert batch["weights"].sum() == sum(e is not None for e in rows)
    assert batch["loss_mask"].sum() == sum(len(e.target_ids) for e in rows if e is not None)
  assert sorted(seen) == list(range(33))  # every current example once per epoch
  # Over many batches the memory rows cover the memory evenly enough (8 rows, 2 per batch).
  drawn = np.concatenate([it.memory_indices(e, s) for e in range(5) for s in range(6)])
  assert set(drawn.tolist()) == set(range(8))


def test_empty_memory_is_the_plain_iterator():
  current = _split("c", _labels({"p": 13}), seed=2)
  plain = BatchIterator(current, INFO, batch_size=4, seed=7)
  mixed = replay.ReplayBatchIterator(current, [], INFO, batch_size=4, ratio=0.5, seed=7)
  assert mixed.memory_rows == 0 and mixed.steps_per_epoch == plain.steps_per_epoch
  for _ in range(2 * plain.steps_per_epoch):
    a, b = next(plain), next(mixed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_determinism_and_exact_resume():
  splits, mem = _memory_examples()
  current = _split("c", _labels({"p": 11, "q": 6}), seed=4, kind="encoder_decoder")

  def make(seed=3, position=None):
    return replay.ReplayBatchIterator(current, mem.examples(splits), INFO, batch_size=6, ratio=0.5, seed=seed,
                                      position=position)

  first, second = make(), make()
  run = [next(first) for _ in range(9)]  # 9 > 6 steps per epoch: crosses into the second epoch
  for a in run:
    b = next(second)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  # A run killed after 4 batches and restarted from its saved position continues with the same batches.
  killed = make()
  for _ in range(4):
    next(killed)
  saved = json.loads(json.dumps(killed.position.to_dict()))
  resumed = make(position=saved)
  for a in run[4:]:
    b = next(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other = make(seed=4)
  assert any(not np.array_equal(a["input_ids"], next(other)["input_ids"]) for a in run)


def test_memory_round_trip_and_errors():
  splits, mem = _memory_examples()
  back = replay.ReplayMemory.from_dict(json.loads(json.dumps(mem.to_dict())))
  assert back == mem and back.examples(splits) == mem.examples(splits)
  assert replay.ReplayMemory.from_dict(None) == replay.ReplayMemory()
  with pytest.raises(ValueError, match="task 1 has 7 training examples"):
    replay.ReplayMemory((1,), (7,)).examples(splits)
  with pytest.raises(ValueError, match="ratio"):
    replay.ReplayOptions(ratio=1.0)
  with pytest.raises(ValueError, match="strategy"):
    replay.ReplayOptions(strategy="herding")
  assert replay.memory_rows(0.99, 4, 10) == 3  # at least one current row per batch
