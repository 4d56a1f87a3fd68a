"""Rank classification: padded, batched, vmapped option scores equal log-softmax sums computed by hand in numpy on
each unpadded sequence (tiny LLaMA and tiny T5), and the prediction is their argmax."""

import jax
import numpy as np
import pytest

from clsvd_jax import models
from clsvd_jax.data import EncodedExample, EncodedSplit, TokenizerInfo
from clsvd_jax.train import rank_classification as rc

VOCAB = 48
INFO = TokenizerInfo(pad_id=0, eos_id=1, bos_id=2, decoder_start_id=0)
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
T5 = dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=2,
          num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
LABELS = ("alpha", "be", "gamma")
OPTION_TOKENS = ([5, 6, 7], [8], [9, 10, 11, 12])  # options of different lengths


def _options():
  rows = [list(t) + [INFO.eos_id] for t in OPTION_TOKENS]
  ids = np.zeros((3, 5), np.int32)
  mask = np.zeros((3, 5), np.int32)
  for k, r in enumerate(rows):
    ids[k, :len(r)], mask[k, :len(r)] = r, 1
  return rc.OptionSet(LABELS, ids, mask)


def _split(kind):
  rng = np.random.RandomState(3)
  examples = []
  for i in range(7):  # 7 rows in batches of 4: the second batch has a filler row
    # Decoder-only prompts of many lengths (left padding varies); encoder inputs of two (each length compiles the
    # reference forward once).
    n = rng.randint(2, 9) if kind == "decoder" else (4, 7)[i % 2]
    body = rng.randint(13, VOCAB, n).tolist()
    prompt = [INFO.bos_id] + body if kind == "decoder" else body + [INFO.eos_id]
    examples.append(EncodedExample(prompt_ids=np.asarray(prompt, np.int32), target_ids=np.asarray([1], np.int32),
                                   prompt=str(i), target=LABELS[i % 3], index=i, task="t"))
  return EncodedSplit(kind=kind, examples=examples, max_length=32, max_target_length=8, name="t")


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


REF_LEN = 16


def _hand_score(forward, kind, prompt, option):
  """Sum of log p(option token | everything before it), without any padding or mask: the sequence is extended at
  its END with arbitrary tokens to a fixed length, which a causal model cannot see from earlier positions (so the
  reference compiles once per shape and shares none of the padding logic under test)."""
  option = list(option) + [INFO.eos_id]
  fill = lambda x: np.asarray([x + [3] * (REF_LEN - len(x))], np.int32)
  if kind == "decoder":
    seq = fill(list(prompt) + option)
    logp = _log_softmax(forward(seq)[0])
    return sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(option))
  enc = np.asarray([prompt], np.int32)
  logp = _log_softmax(forward(enc, fill([INFO.decoder_start_id] + option[:-1]))[0])
  return sum(logp[i, tok] for i, tok in enumerate(option))


@pytest.mark.parametrize("kind,config", [("decoder", LLAMA), ("encoder_decoder", T5)], ids=["llama", "t5"])
def test_scores_match_hand_computation(kind, config):
  model = models.init_from_config(config, seed=1)
  apply_fn, params = models.functional(model)
  split, options = _split(kind), _options()
  scorer = rc.make_option_scorer(apply_fn, kind=kind, decoder_start_id=INFO.decoder_start_id)
  result = rc.rank_classify_split(scorer, params, split, options, INFO, batch_size=4)

  forward = jax.jit(lambda *ids: apply_fn(params, *ids))
  hand = np.asarray([[_hand_score(forward, kind, e.prompt_ids.tolist(), opt) for opt in OPTION_TOKENS]
                     for e in split.examples])
  np.testing.assert_allclose(result.scores, hand, atol=2e-4, rtol=1e-5)
  assert np.ptp(hand, axis=1).min() > 1e-2  # the options are told apart, so the argmax means something
  assert result.predictions == [LABELS[k] for k in np.argmax(hand, 1)]
  assert result.total == 7 and result.targets == [e.target for e in split.examples]
  assert result.correct == sum(p == t for p, t in zip(result.predictions, result.targets))
  assert result.accuracy == pytest.approx(result.correct / 7)


def test_encode_options_and_errors():
  from transformers import ByT5Tokenizer

  tok = ByT5Tokenizer()
  opts = rc.encode_options(tok, ["Good", "Bad"], INFO)
  assert opts.ids.tolist() == [[ord(c) + 3 for c in "Good"] + [INFO.eos_id], [ord(c) + 3 for c in "Bad"]
                               + [INFO.eos_id, INFO.pad_id]]
  assert opts.mask.tolist() == [[1] * 5, [1] * 4 + [0]]
  assert rc.encode_options(tok, ["Good"], INFO, include_eos=False).ids.tolist() == [[ord(c) + 3 for c in "Good"]]
  with pytest.raises(ValueError, match="at least one"):
    rc.encode_options(tok, [], INFO)
  bad = _split("decoder")
  bad.examples[0] = bad.examples[0].__class__(**{**bad.examples[0].__dict__, "target": "delta"})
  with pytest.raises(ValueError, match="not label options"):
    rc.rank_classify_split(None, None, bad, _options(), INFO, batch_size=4)  # refused before any scoring
  with pytest.raises(ValueError, match="model kind"):
    rc.make_option_scorer(None, kind="seq2seq")
