"""The runner on a decoder-only model (tiny LLaMA): left-padded batches, loss on the answer, greedy evaluation."""

import numpy as np
import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.data import BatchIterator
from clsvd_jax.train import runner

LLAMA = {"family": "llama", "tokenizer": "byt5",
         "config": {"vocab_size": 384, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}}


def test_llama_stream_keeps_the_invariant(tmp_path):
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), model=LLAMA)
  p = runner.prepare(C.from_dict(d))
  assert p.kind == "decoder"
  ex = p.train_splits[0].examples[0]
  assert ex.target_ids[-1] == 1 and len(ex.prompt_ids) + len(ex.target_ids) <= 128
  res = runner.run(C.from_dict(d), echo=None, prepared=p)
  assert np.asarray(res["R"]).shape == (2, 2)
  paths = set(res["ranks"][0])
  assert "layers/self_attn/q_proj/weight" in paths and "layers/mlp/down_proj/weight" in paths
  assert set(res["scheduler"]["records"][0]["importance"]) == {"layers"}
  assert 0.0 < res["invariant_max"] <= 1e-5
  # The loss averages over exactly the answer + EOS tokens of the rows each step saw.
  want = seen = 0
  for si, split in enumerate(p.train_splits):
    it = BatchIterator(split, p.info, batch_size=4, seed=si)
    for step in range(4):
      batch = it.batch_at(0, step)
      rows = [split.examples[i] for i in it.permutation(0)[step * 4:(step + 1) * 4]]
      assert batch["loss_mask"][:, 1:].sum() == sum(len(e.target_ids) for e in rows)
      want += sum(len(e.target_ids) for e in rows)
      seen += sum(e.length for e in rows)  # prompt + target (+ BOS): what the progress bar's tok_s counts
  assert res["train_tokens"] == want
  assert res["train_seen_tokens"] == seen
  assert res["tokens_per_second"] == pytest.approx(seen / res["train_seconds"])


def test_activations_basis_on_llama(tmp_path):
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), model=LLAMA,
                       osft={"basis_source": "activations", "start_protecting_from": 2,
                             "rank_policy": {"name": "energy", "eps": 0.9}})
  d["eval"]["initial"] = False
  res = runner.run(C.from_dict(d), echo=None)
  before, after = res["ranks"]
  assert all(np.all(np.asarray(k) == 0) for k in before.values())
  # Energy 0.9 of the first task's matrix inputs: some directions protected in every matrix, never all of them.
  for path, k in after.items():
    k = np.asarray(k)
    assert (k > 0).all() and (k < 16).all(), (path, k)
  assert 0.0 < res["invariant_max"] <= 1e-5
