"""Tokenisation and batching: truncation counts, buckets, padding sides, loss masks, shuffling, hosts, resume."""

import numpy as np
import pytest
import transformers

from clsvd_jax import data as D

TOK = transformers.ByT5Tokenizer()  # byte-level: token = byte + 3, pad 0, eos 1, no BOS


def make_task(labels=("negative", "positive"), template=None, side="left"):
  return D.Task(name="toy", group="SC", labels=labels, source="cl_benchmark", instruction="Rate it.\n",
                template=template or D.DEFAULT_TEMPLATE, splits={"train": "train", "eval": "test"},
                truncation_side=side)


def make_examples(n, rng=None, long_every=0):
  rng = rng or np.random.default_rng(0)
  out = []
  for i in range(n):
    words = " ".join("w" * int(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 7))))
    if long_every and i % long_every == 0:
      words = "START " + "x" * 400 + " END"
    out.append(D.Example(sentence=words, answer=["negative", "positive"][i % 2], index=i))
  return out


def test_truncation_is_counted_keeps_the_cue_and_never_crashes():
  task = make_task()
  exs = make_examples(20, long_every=5)
  enc = D.encode_examples(task, exs, TOK, kind="decoder", max_length=128, max_target_length=12)
  assert enc.truncated_prompts == 4 and enc.truncated_targets == 0
  assert "4 prompts truncated" in enc.report()
  head, tail = D.prompt_parts(task)
  for e in enc.examples:
    assert e.length <= 128 and e.prompt.startswith(head) and e.prompt.endswith(tail)
    assert bytes(int(t) - 3 for t in e.prompt_ids).decode() == e.prompt  # ids are the prompt text, no BOS
    if e.truncated:  # left side: the start of the sentence goes, its end survives
      assert "START" not in e.prompt and e.prompt.endswith("x END\nAnswer:") and e.length == 128
  right = D.encode_examples(make_task(side="right"), exs[:1], TOK, kind="decoder", max_length=128,
                            max_target_length=12)
  assert "START x" in right.examples[0].prompt and "END" not in right.examples[0].prompt
  cut = D.encode_examples(task, [D.Example("s", "positive" * 10, 0)], TOK, kind="decoder", max_length=96,
                          max_target_length=6)
  assert cut.truncated_targets == 1 and list(cut.examples[0].target_ids) == [ord(c) + 3 for c in "posit"] + [1]
  assert cut.examples[0].target == "positive" * 10  # evaluation still compares with the full answer


def test_template_longer_than_max_length_is_a_config_error():
  with pytest.raises(D.DataError, match=r"prompt without its sentence takes \d+ tokens but max_length=40.*raise "
                     "max_length"):
    D.encode_examples(make_task(), make_examples(1, long_every=1), TOK, kind="decoder", max_length=40)


def test_decoder_only_left_padding_and_target_only_loss_mask():
  task = make_task()
  enc = D.encode_examples(task, make_examples(6), TOK, kind="decoder", max_length=128, max_target_length=12)
  info = D.tokenizer_info(TOK, "decoder")
  assert info.bos_id is None and info.eos_id == 1 and info.pad_id == 0
  b = next(D.BatchIterator(enc, info, batch_size=4, shuffle=False))
  assert set(b) == {"input_ids", "attention_mask", "loss_mask", "weights"} and b["input_ids"].dtype == np.int32
  for i in range(4):
    e = enc.examples[i]
    n = e.length
    row, mask, loss = b["input_ids"][i], b["attention_mask"][i], b["loss_mask"][i]
    assert (mask[:-n] == 0).all() and (mask[-n:] == 1).all() and (row[:-n] == info.pad_id).all()
    np.testing.assert_array_equal(row[-n:], np.concatenate([e.prompt_ids, e.target_ids]))
    # The loss covers exactly the answer bytes and EOS.
    np.testing.assert_array_equal(row[loss == 1], e.target_ids)
    assert row[loss == 1][-1] == info.eos_id
    assert bytes(int(t) - 3 for t in row[loss == 1][:-1]).decode() == e.target


def test_decoder_only_bos_is_prepended_when_the_tokenizer_adds_one():
  enc = D.encode_examples(make_task(), make_examples(2), TOK, kind="decoder", max_length=128, add_bos=False)
  assert enc.examples[0].prompt_ids[0] != 2
  TOK.bos_token = "<unk>"  # any existing token will do for the check
  try:
    info = D.tokenizer_info(TOK, "decoder", add_bos=True)
    enc = D.encode_examples(make_task(), make_examples(2), TOK, kind="decoder", max_length=128, add_bos=True)
  finally:
    TOK.bos_token = None
  assert info.bos_id == 2 and enc.examples[0].prompt_ids[0] == 2
  b = next(D.BatchIterator(enc, info, batch_size=2, shuffle=False))
  assert (b["loss_mask"] * (b["input_ids"] == 2)).sum() == 0  # BOS is never a target


def test_encoder_decoder_labels_and_shift_right():
  enc = D.encode_examples(make_task(), make_examples(5), TOK, kind="encoder_decoder", max_length=128,
                          max_target_length=16)
  info = D.tokenizer_info(TOK, "encoder_decoder")
  b = next(D.BatchIterator(enc, info, batch_size=4, shuffle=False))
  assert set(b) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels",
                    "loss_mask", "weights"}
  for i in range(4):
    e = enc.examples[i]
    n, t = len(e.prompt_ids), len(e.target_ids)
    assert e.prompt_ids[-1] == info.eos_id  # T5 inputs end with EOS
    np.testing.assert_array_equal(b["input_ids"][i, :n], e.prompt_ids)  # right padded
    assert (b["attention_mask"][i, :n] == 1).all() and (b["attention_mask"][i, n:] == 0).all()
    labels = b["labels"][i]
    np.testing.assert_array_equal(labels[:t], e.target_ids)
    assert labels[t - 1] == info.eos_id and (labels[t:] == info.pad_id).all()
    np.testing.assert_array_equal(b["decoder_input_ids"][i, :t], np.concatenate([[info.decoder_start_id],
                                                                                 labels[:t - 1]]))
    np.testing.assert_array_equal(b["loss_mask"][i], (np.arange(labels.size) < t).astype(np.float32))
    np.testing.assert_array_equal(b["decoder_attention_mask"][i], b["loss_mask"][i])


def test_buckets_bound_the_number_of_shapes():
  assert D.bucket_lengths(256) == (16, 32, 64, 128, 256)
  assert D.bucket_lengths(100, 10) == (16, 32, 64, 100)
  assert D.pick_bucket(33, (16, 32, 64)) == 64
  with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
    D.pick_bucket(65, (16, 32, 64))
  rng = np.random.default_rng(1)
  exs = [D.Example(sentence="y" * int(rng.integers(1, 180)), answer="positive", index=i) for i in range(100)]
  for kind in ("decoder", "encoder_decoder"):
    enc = D.encode_examples(make_task(), exs, TOK, kind=kind, max_length=256, max_target_length=16)
    assert len({len(e.prompt_ids) for e in enc.examples}) > 50
    it = D.BatchIterator(enc, D.tokenizer_info(TOK, kind), batch_size=1, seed=0)
    shapes = it.shapes()
    # 100 batches of > 50 distinct lengths (70 to 250 tokens) compile for 2 shapes: 128 and 256 long.
    lengths = {e.length if kind == "decoder" else len(e.prompt_ids) for e in enc.examples}
    assert {dict(s)["input_ids"][1] for s in shapes} == {D.pick_bucket(n, D.bucket_lengths(256)) for n in lengths}
    assert len(shapes) == 2, shapes
    for s in shapes:
      assert dict(s)["input_ids"][1] in D.bucket_lengths(256)


def test_last_partial_batch_is_filled_with_weight_zero_rows():
  enc = D.encode_examples(make_task(), make_examples(10), TOK, kind="decoder", max_length=128)
  info = D.tokenizer_info(TOK, "decoder")
  it = D.BatchIterator(enc, info, batch_size=4, seed=0, num_epochs=1)
  batches = list(it)
  assert len(batches) == 3 == it.steps_per_epoch and it.position == D.Position(1, 0)
  assert all(b["input_ids"].shape[0] == 4 for b in batches)
  np.testing.assert_array_equal(batches[-1]["weights"], [1, 1, 0, 0])
  assert batches[-1]["loss_mask"][2:].sum() == 0 and (batches[-1]["attention_mask"][2:].sum(1) > 0).all()
  assert sum(b["weights"].sum() for b in batches) == 10
  assert len(list(D.BatchIterator(enc, info, batch_size=4, num_epochs=1, drop_remainder=True))) == 2


def _rows(batch):
  # Identify a row by its (unpadded) token sequence.
  return [tuple(r[m == 1]) for r, m, w in zip(batch["input_ids"], batch["attention_mask"], batch["weights"]) if w]


def test_shuffle_is_deterministic_per_seed_and_epoch():
  enc = D.encode_examples(make_task(), make_examples(40), TOK, kind="decoder", max_length=128)
  info = D.tokenizer_info(TOK, "decoder")
  a = D.BatchIterator(enc, info, batch_size=8, seed=7)
  b = D.BatchIterator(enc, info, batch_size=8, seed=7)
  c = D.BatchIterator(enc, info, batch_size=8, seed=8)
  ra, rb, rc = ([_rows(next(it)) for _ in range(10)] for it in (a, b, c))
  assert ra == rb and ra != rc
  assert ra[:5] != ra[5:]  # epoch 1 is another order
  assert sorted(sum(ra[:5], [])) == sorted(sum(ra[5:], []))  # ... of the same 40 examples


@pytest.mark.parametrize("n", [22, 19])  # 19: host 1's part of the last batch is all filler
def test_two_hosts_partition_every_global_batch(n):
  enc = D.encode_examples(make_task(), make_examples(n), TOK, kind="encoder_decoder", max_length=128)
  info = D.tokenizer_info(TOK, "encoder_decoder")
  glob = D.BatchIterator(enc, info, batch_size=8, seed=3)
  hosts = [D.BatchIterator(enc, info, batch_size=8, seed=3, process_index=p, process_count=2) for p in range(2)]
  for _ in range(glob.steps_per_epoch * 2):
    g, h0, h1 = next(glob), next(hosts[0]), next(hosts[1])
    for k in g:
      assert h0[k].shape[0] == 4 and h0[k].shape[1:] == h1[k].shape[1:] == g[k].shape[1:]  # same bucket
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    D.BatchIterator(enc, info, batch_size=8, process_count=3, process_index=0)
  # Evaluation: hosts see disjoint examples, together all of them, and the same number of batches.
  evals = [list(D.eval_batches(enc, info, batch_size=8, process_index=p, process_count=2)) for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == 3
  seen = sorted(int(i) for host in evals for b in host for i in b["index"] if i >= 0)
  assert seen == list(range(n))
  assert all(w == 0 for host in evals for b in host for w, i in zip(b["weights"], b["index"]) if i < 0)


def test_resume_position_reproduces_the_remaining_batches():
  enc = D.encode_examples(make_task(), make_examples(30), TOK, kind="decoder", max_length=128)
  info = D.tokenizer_info(TOK, "decoder")
  full = D.BatchIterator(enc, info, batch_size=4, seed=11)
  expected = [next(full) for _ in range(20)]  # crosses two epoch boundaries (8 steps per epoch)
  first = D.BatchIterator(enc, info, batch_size=4, seed=11)
  for _ in range(9):
    next(first)
  saved = first.position.to_dict()
  assert saved == {"epoch": 1, "step": 1}
  resumed = D.BatchIterator(enc, info, batch_size=4, seed=11, position=saved)
  for want in expected[9:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_batches_carry_strings_and_left_padded_prompts():
  task = make_task()
  exs = make_examples(5)
  enc = D.encode_examples(task, exs, TOK, kind="decoder", max_length=128)
  info = D.tokenizer_info(TOK, "decoder")
  (b,) = list(D.eval_batches(enc, info, batch_size=8))
  assert b["prompts"][:5] == [D.build_prompt(task, e) for e in exs] and b["prompts"][5:] == ["", "", ""]
  assert b["targets"][:5] == [e.answer for e in exs] and b["tasks"][0] == "toy"
  np.testing.assert_array_equal(b["index"], [0, 1, 2, 3, 4, -1, -1, -1])
  for i in range(5):
    n = len(enc.examples[i].prompt_ids)
    np.testing.assert_array_equal(b["input_ids"][i, -n:], enc.examples[i].prompt_ids)
    assert b["attention_mask"][i, :-n].sum() == 0


def test_concat_mixes_tasks_for_multitask_training():
  a = D.encode_examples(make_task(), make_examples(3), TOK, kind="decoder", max_length=128, split="a")
  b = D.encode_examples(make_task(labels=("x", "y")), make_examples(2), TOK, kind="decoder", max_length=64)
  mixed = D.EncodedSplit.concat([a, b])
  assert len(mixed) == 5 and mixed.max_length == 128
  with pytest.raises(ValueError, match="mixed model kinds"):
    D.EncodedSplit.concat([a, D.encode_examples(make_task(), make_examples(1), TOK, kind="encoder_decoder",
                                                max_length=128)])
