"""model.tokenizer: bpe, a byte-level BPE learnt from the stream's training text (for models built from scratch)."""

import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.config import ConfigError, ModelConfig
from clsvd_jax.data import load_tasks, parse_task_specs
from clsvd_jax.train import model_io, runner

TEXTS = ["Title: Co. Converts Buses Into Rolling Labs (AP)\nText: An Ohio company converts school buses.",
         "Science or Technology", "World", "Sports", "Business", "very negative", "Café déjà vu — 東京 {braces}"] * 20


def test_bpe_round_trips_exactly_and_is_deterministic():
  tok = model_io.train_bpe_tokenizer(TEXTS, 300)
  assert len(tok) == 300 and tok.pad_token_id == 0 and tok.eos_token_id == 1
  for text in set(TEXTS) | {"never seen: ünïcödé ∑ 42"}:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
  # Frequent text gets merged into fewer tokens than bytes (what makes it cheaper than ByT5).
  assert len(tok("Science or Technology", add_special_tokens=False)["input_ids"]) < len("Science or Technology")
  assert model_io.train_bpe_tokenizer(TEXTS, 300).get_vocab() == tok.get_vocab()


def test_corpus_is_the_training_text_only(tmp_path):
  d = tiny_config_dict(tmp_path, tasks=("low", "high"))
  datas = load_tasks(parse_task_specs(d["tasks"]))
  corpus = model_io.tokenizer_corpus(datas)
  assert len(corpus) == 2 * sum(len(t.train) for t in datas)
  train_answers = {ex.answer for t in datas for ex in t.train}
  assert set(corpus[1::2]) == {ex.answer for t in datas for ex in t.train} and train_answers
  eval_only = {ex.sentence for t in datas for ex in t.eval} - {ex.sentence for t in datas for ex in t.train}
  assert not any(s in prompt for s in eval_only for prompt in corpus[::2])


def test_bpe_errors_name_the_key():
  with pytest.raises(ConfigError, match="model.tokenizer_vocab_size=100"):
    model_io.train_bpe_tokenizer(TEXTS, 100)
  with pytest.raises(ConfigError, match="model.tokenizer=bpe: a tokenizer learnt from the stream's text only suits"):
    model_io.load_tokenizer(ModelConfig(path="ckpt", tokenizer="bpe"), tasks=[])


def test_a_run_with_the_bpe_tokenizer(tmp_path):
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), training={"steps_per_task": 2})
  d["model"]["tokenizer"] = "bpe"
  d["model"]["tokenizer_vocab_size"] = 512
  with pytest.raises(ConfigError, match="vocab_size=384 but the tokenizer has 512 tokens"):
    runner.prepare(C.from_dict(d))
  d["model"]["config"]["vocab_size"] = 512
  cfg = C.from_dict(d)
  p = runner.prepare(cfg)
  assert len(p.tokenizer) == 512
  # Prepared twice (as `clsvd eval` and `--resume` do), the tokenizer and the encoded prompts are the same.
  again = runner.prepare(cfg)
  assert again.tokenizer.get_vocab() == p.tokenizer.get_vocab()
  assert [e.prompt_ids.tolist() for e in again.eval_splits[0].examples] == \
         [e.prompt_ids.tolist() for e in p.eval_splits[0].examples]
  res = runner.run(cfg, echo=None, prepared=p)
  assert len(res["R"]) == 2
