"""Data pipeline: task specs, source readers, prompts, tokenisation, batching, normalisation, synthetic stream.

Typical use (what the runner does for each task)::

  specs = parse_task_specs(config["tasks"])
  stream = load_tasks(specs, base_dir=config_dir)          # every problem reported before training starts
  train, evals = encode_task(stream[0], tokenizer, kind="decoder", max_length=256, max_target_length=16)
  info = tokenizer_info(tokenizer, "decoder")
  it = BatchIterator(train, info, batch_size=32, seed=0)     # save it.position.to_dict() in checkpoints
  for batch in eval_batches(evals, info, batch_size=64): ...
"""

from clsvd_jax.data.batching import (
  BatchIterator,
  Position,
  bucket_lengths,
  collate,
  eval_batches,
  pick_bucket,
)
from clsvd_jax.data.normalize import exact_match, exact_match_accuracy, normalize_answer
from clsvd_jax.data.prompts import (
  DEFAULT_TEMPLATE,
  FREEFORM_TEMPLATE,
  IDENTITY_TEMPLATE,
  OLORA_INSTRUCTIONS,
  build_prompt,
  check_template,
  prompt_parts,
)
from clsvd_jax.data.sources import (
  TFDS_FORMATS,
  TaskData,
  TfdsFormat,
  load_task,
  load_tasks,
  read_json,
  read_tfds_split,
  subsample,
)
from clsvd_jax.data.synthetic import (
  DEFAULT_TASKS as SYNTHETIC_TASKS,
)
from clsvd_jax.data.synthetic import (
  SyntheticTask,
  ensure_synthetic_benchmark,
  synthetic_task_configs,
  write_synthetic_benchmark,
)
from clsvd_jax.data.tasks import SOURCES, DataError, Example, Task, TaskSpec, parse_task_specs
from clsvd_jax.data.tokenize import (
  KINDS,
  EncodedExample,
  EncodedSplit,
  TokenizerInfo,
  encode_examples,
  encode_task,
  tokenizer_info,
)

__all__ = [
  "DEFAULT_TEMPLATE",
  "FREEFORM_TEMPLATE",
  "IDENTITY_TEMPLATE",
  "KINDS",
  "OLORA_INSTRUCTIONS",
  "SOURCES",
  "SYNTHETIC_TASKS",
  "TFDS_FORMATS",
  "BatchIterator",
  "DataError",
  "EncodedExample",
  "EncodedSplit",
  "Example",
  "Position",
  "SyntheticTask",
  "Task",
  "TaskData",
  "TaskSpec",
  "TfdsFormat",
  "TokenizerInfo",
  "build_prompt",
  "bucket_lengths",
  "check_template",
  "collate",
  "encode_examples",
  "encode_task",
  "ensure_synthetic_benchmark",
  "eval_batches",
  "exact_match",
  "exact_match_accuracy",
  "load_task",
  "load_tasks",
  "normalize_answer",
  "parse_task_specs",
  "pick_bucket",
  "prompt_parts",
  "read_json",
  "read_tfds_split",
  "subsample",
  "synthetic_task_configs",
  "tokenizer_info",
  "write_synthetic_benchmark",
]
