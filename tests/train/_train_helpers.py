"""Helpers of the runner tests: a tiny T5 on the synthetic stream (seconds per run on 2 cores)."""

import copy

TINY_MODEL = {"family": "t5", "tokenizer": "byt5",
              "config": {"vocab_size": 384, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
                         "num_decoder_layers": 1, "num_heads": 4, "feed_forward_proj": "relu",
                         "tie_word_embeddings": False, "scale_decoder_outputs": False}}


def tiny_config_dict(tmp_path, method="osft", tasks=("low", "high", "mark"), **sections):
  """A config dict of a 3-task synthetic stream on a tiny T5; ``sections`` update the defaults per section."""
  d = {
    "model": copy.deepcopy(TINY_MODEL),
    "tasks": [{"name": n, "source": "synthetic", "path": str(tmp_path / "data"), "max_train": 32, "max_eval": 8}
              for n in tasks],
    "method": method,
    "osft": {"rank_policy": {"name": "importance", "mrr": 0.2, "trr": 0.6}, "calibration_batches": 1},
    "optimizer": {"lr": 3e-3},
    "training": {"steps_per_task": 4, "batch_size": 4, "max_length": 128, "max_target_length": 8,
                 "progress": False, "log_every": 2},
    "eval": {"batch_size": 8, "max_new_tokens": 4},
    "run_dir": str(tmp_path / f"run_{method}"),
  }
  for key, value in sections.items():
    if isinstance(value, dict) and isinstance(d.get(key), dict):
      d[key].update(value)
    else:
      d[key] = value
  return d
