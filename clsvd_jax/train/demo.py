"""The offline demo (``clsvd demo``, ``make demo``): sequential fine-tuning vs the constrained method.

A tiny T5 (built from a config, random weights, the byte-level ByT5 tokenizer: no files, no network) learns the
project's own synthetic task stream (``clsvd_jax.data.synthetic``: four tasks, each with its own input alphabet,
rule and label words) one task after another, once with ``seqft`` (plain AdamW) and once with ``osft`` (the same
AdamW under the orthogonal-complement constraint). The model is trained from scratch, so protection starts at
task 2 and the protected directions come from the finished tasks' input activations (DESIGN 4b: on a model without
pretraining the top singular directions of W are mostly its random initialisation, not what task 1 taught it).

Both R matrices and AA/BWT are printed side by side; results and plots go under ``<out>/seqft`` and
``<out>/osft`` (replacing those of an earlier demo there); ``<out>/summary.json`` holds the headline figures.
``configs/demo.yaml`` is the same config.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from clsvd_jax import config as config_lib
from clsvd_jax.train import outputs, runner

TASKS = ("low", "high", "mark", "sign")

# configs/demo.yaml holds the same settings (a test keeps the two equal).
DEMO_CONFIG: dict[str, Any] = {
  "name": "demo",
  "model": {
    "family": "t5",
    "tokenizer": "byt5",
    "config": {"vocab_size": 384, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
               "num_decoder_layers": 1, "num_heads": 4, "feed_forward_proj": "relu",
               "tie_word_embeddings": False, "scale_decoder_outputs": False},
  },
  "tasks": [{"name": n, "source": "synthetic", "path": "data", "max_eval": 100} for n in TASKS],
  "method": "osft",
  "osft": {
    "sides": "both",
    "basis_source": "activations",
    "start_protecting_from": 2,
    "rank_policy": {"name": "energy", "eps": 0.99},
    "calibration_batches": 4,
  },
  "optimizer": {"lr": 1.0e-3, "weight_decay": 0.0, "clip_norm": 1.0},
  "training": {"steps_per_task": 150, "batch_size": 32, "max_length": 128, "max_target_length": 8, "seed": 0},
  "eval": {"batch_size": 100, "max_new_tokens": 6},
  "run_dir": "runs/demo/osft",
  "data_dir": "runs/demo",
}

METHODS = ("seqft", "osft")


def demo_config(method: str, out: str | Path, *, steps: int | None = None, progress: bool = True
                ) -> config_lib.RunConfig:
  """The demo's config for ``method`` with outputs under ``<out>/<method>`` and the data under ``<out>/data``."""
  out = Path(out)
  d = copy.deepcopy(DEMO_CONFIG)
  d["method"] = method
  d["name"] = f"demo-{method}"
  d["run_dir"] = str(out / method)
  d["data_dir"] = str(out)
  d["training"]["progress"] = progress
  if steps is not None:
    d["training"]["steps_per_task"] = steps
  return config_lib.from_dict(d, "demo config")


def run_demo(out: str | Path = "runs/demo", *, steps: int | None = None, progress: bool = True,
             echo: Any = print) -> dict[str, dict[str, Any]]:
  """Runs seqft then osft on the synthetic stream and prints both R matrices and AA/BWT side by side.

  Returns:
    ``{method: results}``.
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  say = echo or (lambda _m: None)
  results = {}
  t0 = time.perf_counter()
  for method in METHODS:
    cfg = demo_config(method, out, steps=steps, progress=progress)
    say(f"== {method}: {len(TASKS)} synthetic tasks, {cfg.training.steps_per_task} steps each ==")
    # The demo's own folders: a new demo replaces the last one (a plain run would refuse a folder with files).
    results[method] = runner.run(cfg, echo=None, overwrite=True)
    say(outputs.format_summary(results[method]))
  elapsed = time.perf_counter() - t0
  table = outputs.format_side_by_side(results)
  say("")
  say(table)
  bwt = {m: results[m]["BWT"] for m in METHODS}
  verdict = ("osft forgets less than seqft" if bwt["osft"] > bwt["seqft"] else
             "osft does NOT forget less than seqft on this run")
  say(f"\n{verdict}: BWT {100 * bwt['osft']:.1f} vs {100 * bwt['seqft']:.1f} (points of accuracy); "
      f"{elapsed:.0f} s in all; results and plots under {out}/")
  (out / "comparison.txt").write_text(table + "\n", encoding="utf-8")
  outputs.write_json(out / "summary.json", {
    m: {k: results[m][k] for k in ("AA", "BWT", "FWT", "forgetting", "pooled_accuracy", "invariant_max", "R",
                                   "R_initial", "tasks", "train_seconds")} for m in METHODS} | {"seconds": elapsed})
  return results
