"""The runner's configuration: a typed schema (dataclasses) for the YAML files under ``configs/``.

A config file is a mapping with the sections of ``RunConfig``. Loading validates every key against the schema:
an unknown key or a value of the wrong type is an error that names the key path (``osft.rank_policy.mrr``) and
lists the keys allowed there. ``--set a.b=c`` overrides are parsed as YAML values (``--set training.seed=3``,
``--set osft.sides=left``, ``--set 'osft.param_policy.freeze=[embedding]'``).

Example (the demo's osft run, abbreviated)::

  model: {family: t5, tokenizer: byt5, config: {d_model: 64, num_layers: 2, num_heads: 4, d_kv: 16, d_ff: 128}}
  tasks: [{name: low, source: synthetic}, {name: high, source: synthetic}]
  method: osft
  osft: {rank_policy: {name: energy, eps: 0.9}, basis_source: activations, start_protecting_from: 2}
  optimizer: {lr: 3.0e-3, weight_decay: 0.0}
  training: {steps_per_task: 200, batch_size: 32, max_length: 128, max_target_length: 8}
  run_dir: runs/demo/osft
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from etils import epath

from clsvd_jax.data.tasks import DataError, parse_task_specs
from clsvd_jax.methods.registry import METHODS


class ConfigError(ValueError):
  """A config that does not fit the schema; the message names the file, the key path and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
  """Which model to train.

  Attributes:
    path: a Hugging Face checkpoint directory (config.json + safetensors) for ``clsvd_jax.models.from_pretrained``.
    family: model family of an inline ``config`` (``t5`` or ``llama``); ignored with ``path``.
    config: an inline Hugging Face style config (a tiny model built from scratch with random weights).
    tokenizer: ``byt5`` (the byte-level tokenizer, no files needed), ``bpe`` (a byte-level BPE learnt from the
      stream's training prompts and answers, for a model built from ``config``; ``tokenizer_vocab_size``
      entries, so ``config.vocab_size`` must be at least that) or a tokenizer directory; default the checkpoint
      directory ``path``.
    tokenizer_vocab_size: vocabulary size of the ``bpe`` tokenizer.
    dtype: the precision the weights are read in, ``float32`` or ``bfloat16`` (``bfloat16`` rounds every weight
      to bf16 first: exact for a bf16 checkpoint, the values a bf16 model has). Whatever it is, the model is
      trained and evaluated with float32 master weights (docs/design.md §6b: updating bf16 parameters breaks the
      orthogonality guarantee, ``||U^T dW|| / ||dW||`` ~0.5); bf16 compute is ``training.bf16_compute``.
    init_seed: seed of the random initialisation of an inline config.
  """

  path: str | None = None
  family: Literal["t5", "llama"] = "t5"
  config: dict[str, Any] | None = None
  tokenizer: str | None = None
  tokenizer_vocab_size: int = 4096
  dtype: Literal["float32", "bfloat16"] = "float32"
  init_seed: int = 0


@dataclasses.dataclass
class RankPolicyConfig:
  """How many directions each matrix protects before a task (docs/design.md §4).

  Attributes:
    name: ``importance`` (the paper: retention ratio from block importance), ``schedule`` (ratio grows with the
      task index), ``energy`` (smallest rank keeping a fraction ``eps`` of the spectrum) or ``none`` (protect
      nothing: plain fine-tuning through the same code path).
    mrr: minimum retention ratio (least important block), importance policy.
    trr: top retention ratio (most important block), importance policy.
    importance_direction: ``1-cos`` (default) or ``cos``. A block whose output stays close to its input (cosine
      near 1) barely transforms the residual stream; ``1-cos`` calls the blocks that change it most important and
      protects more of them (the block-influence reading of the paper's measure). ``cos`` reverses the order.
    growth: importance policy: ``absolute`` (the paper: k = r * min(m, n), never below the previous rank) or
      ``incremental`` (each task protects a fraction r of the directions still free, so subspaces keep growing
      task after task).
    rate: schedule policy: ratio = rate * number of finished tasks (the official code's 0.07 t).
    max_ratio: schedule policy: cap of the ratio.
    eps: energy policy: fraction of the squared spectrum (of W, or of the input covariance with the activations
      basis source) the protected subspace must hold.
  """

  name: Literal["importance", "schedule", "energy", "none"] = "importance"
  mrr: float = 0.1
  trr: float = 0.8
  importance_direction: Literal["1-cos", "cos"] = "1-cos"
  growth: Literal["absolute", "incremental"] = "absolute"
  rate: float = 0.07
  max_ratio: float = 0.95
  eps: float = 0.95


@dataclasses.dataclass
class ParamPolicyConfig:
  """Regex rules over parameter paths (``clsvd_jax.ParamPolicy``); freeze rules win over train over constrain.

  The policy in force is resolved per run (``clsvd_jax.train.step.run_param_policy``) and written to
  ``results.json`` (``param_policy``). With ``default: auto``:

  * ``seqft`` and ``mtl`` (methods that constrain nothing) are full fine-tuning: every parameter trains, the
    ``constrain`` matrices included (only explicit ``freeze`` rules hold parameters still);
  * ``osft`` on a pretrained checkpoint (``model.path``) constrains the matrices and freezes everything else
    (embeddings, lm_head, norms, relative-position bias): the paper's setting;
  * ``osft`` on a model built from ``model.config`` (random weights) constrains the matrices and trains everything
    else freely: frozen random embeddings and a frozen random head leave a from-scratch model unable to learn.

  Attributes:
    constrain: patterns of the matrices that get the orthogonal-complement update (default attention + MLP).
    freeze: patterns of parameters that never change.
    train: patterns of parameters trained freely (unconstrained).
    default: action for paths no rule matches: ``auto`` (see above), ``freeze``, ``train`` or ``constrain``.
  """

  constrain: list[str] | None = None
  freeze: list[str] = dataclasses.field(default_factory=list)
  train: list[str] = dataclasses.field(default_factory=list)
  default: Literal["auto", "freeze", "train", "constrain"] = "auto"


@dataclasses.dataclass
class OsftConfig:
  """Options of the constrained method (also read by ``seqft``/``mtl`` for the parameter policy).

  Attributes:
    sides: projection variant ``both`` | ``left`` | ``right`` | ``block``.
    project_gradients: also project the incoming gradient (the moments then live in the complement).
    basis_source: ``weights`` (the paper: SVD of W) or ``activations`` (input covariances of the finished tasks at
      each constrained matrix, docs/design.md §4b; needs ``start_protecting_from: 2`` and a model family that exposes
      matrix inputs).
    rank_policy: see ``RankPolicyConfig``.
    min_trainable: directions of every matrix that always stay free.
    max_rank_ratio: largest protected fraction the bases must hold (sets their capacity).
    start_protecting_from: 1 = protect before the first task (a pretrained model), 2 = train task 1 freely
      and protect from the second task on (a model trained from scratch).
    reset_moments: reset Adam's moments at every task boundary (else keep them, projected from then on).
    calibration_batches: batches of the calibration pass (block importance, input covariances).
    calibration_batch_size: rows per calibration batch (default the training batch size).
    calibration_task: which data the block importance is measured on: the ``new`` task (the paper) or the
      ``previous`` one.
    param_policy: see ``ParamPolicyConfig``.
    solver: how a boundary decomposes each matrix: ``exact`` (full SVD / eigh) or ``randomized`` (randomized
      subspace iteration for the new directions, ``clsvd_jax.compute_subspaces(solver=...)``; at LLaMA-2-7B shapes
      about 1-2% of a short task's time against 16% for ``exact`` on a CPU, ``benchmarks/boundary.py``; on small
      matrices it is slower, as it compiles a program per rank). One device only for now: a run on a mesh refuses
      ``randomized``.
  """

  sides: Literal["both", "left", "right", "block"] = "both"
  project_gradients: bool = True
  basis_source: Literal["weights", "activations"] = "weights"
  rank_policy: RankPolicyConfig = dataclasses.field(default_factory=RankPolicyConfig)
  min_trainable: int = 1
  max_rank_ratio: float = 1.0
  start_protecting_from: Literal[1, 2] = 1
  reset_moments: bool = False
  calibration_batches: int = 1
  calibration_batch_size: int | None = None
  calibration_task: Literal["new", "previous"] = "new"
  param_policy: ParamPolicyConfig = dataclasses.field(default_factory=ParamPolicyConfig)
  solver: Literal["exact", "randomized"] = "exact"


@dataclasses.dataclass
class ReplayConfig:
  """Options of ``method: replay`` (``clsvd_jax.methods.replay``).

  Attributes:
    memory_per_task: training examples kept from each finished task (all of them when its split is smaller).
    strategy: ``reservoir`` (a uniform subset) or ``per_label`` (balanced over the task's answers).
    ratio: share of every training batch drawn from the memory once it holds anything, in [0, 1).
  """

  memory_per_task: int = 100
  strategy: Literal["reservoir", "per_label"] = "reservoir"
  ratio: float = 0.25


@dataclasses.dataclass
class EwcConfig:
  """Options of ``method: ewc`` (``clsvd_jax.methods.ewc``).

  Attributes:
    lam: lambda, the weight of the penalty ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``.
    decay: older tasks' Fishers are scaled by this at every boundary (1: the exact sum of per-task penalties).
    fisher_batches: batches of the finished task's training data the diagonal Fisher is averaged over.
    fisher_batch_size: rows per Fisher batch (default the training batch size); every row costs one backward pass.
  """

  lam: float = 100.0
  decay: float = 1.0
  fisher_batches: int = 4
  fisher_batch_size: int | None = None


@dataclasses.dataclass
class LoraConfig:
  """Options of ``method: lora`` (one adapter trained through the stream) and ``olora`` (O-LoRA: a new adapter per
  task, the old ones frozen, with the orthogonality and norm penalties); ``clsvd_jax.methods.lora``.

  Attributes:
    rank: rank r of each adapter.
    alpha: the adapter's update is scaled by ``alpha / rank``.
    targets: regexes over parameter paths of the adapted matrices (default: the attention query and value
      projections, T5's cross-attention included).
    lambda1: O-LoRA's orthogonality weight (``sum |A_old A_new^T|``).
    lambda2: O-LoRA's norm weight on the new adapter.
    orthogonality: ``abs`` (O-LoRA's code) or ``squared`` (its paper's equation).
  """

  rank: int = 8
  alpha: float = 32.0
  targets: list[str] | None = None
  lambda1: float = 0.5
  lambda2: float = 0.0
  orthogonality: Literal["abs", "squared"] = "abs"


@dataclasses.dataclass
class GpmConfig:
  """Options of ``method: gpm`` (``clsvd_jax.methods.gpm``): the ``osft`` section is replaced by GPM's preset.

  Attributes:
    eps: energy threshold: after each task the protected input basis of every matrix holds at least this fraction
      of the task's input energy.
    max_rank_ratio: cap of the protected fraction (sizes the bases); default ``osft.max_rank_ratio``.
  """

  eps: float = 0.97
  max_rank_ratio: float | None = None


@dataclasses.dataclass
class OptimizerConfig:
  """AdamW and its learning-rate schedule (restarted at every task).

  Attributes:
    lr: peak learning rate.
    weight_decay: decoupled weight decay (runs before the final projection, so protected directions never shrink).
    b1, b2, eps: Adam's constants.
    warmup_steps: linear warm-up steps at the start of each task.
    schedule: ``constant``, ``linear`` (decay to 0 at the task's last step) or ``cosine``.
    grad_accum: micro-batches per optimizer step (the batch is split; the gradient equals the full batch's).
    clip_norm: clip the global gradient norm (``null``: no clipping).
  """

  lr: float = 1e-3
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  warmup_steps: int = 0
  schedule: Literal["constant", "linear", "cosine"] = "constant"
  grad_accum: int = 1
  clip_norm: float | None = 1.0


@dataclasses.dataclass
class TrainingConfig:
  """The training loop.

  Attributes:
    epochs: epochs per task (used when ``steps_per_task`` is not set).
    steps_per_task: optimizer steps per task (overrides ``epochs``).
    batch_size: global batch size (rows per optimizer step).
    max_length: longest input (decoder-only: prompt + target) in tokens.
    max_target_length: longest target (with EOS) in tokens.
    bf16_compute: run the forward and backward pass in bfloat16 (float32 master weights and optimizer state).
    seed: data order (and anything random in training).
    checkpoint_every: also save a checkpoint every N optimizer steps (0: only at task boundaries).
    keep_checkpoints: complete checkpoints kept on disk (the newest ones).
    log_every: steps between fetches of the training metrics from the device (TensorBoard, progress bar, the
      non-finite check); between them the host never waits for the device. 0: fetch only at checkpoints and at
      the end of each task.
    progress: show tqdm progress bars.
    watchdog_seconds: stop the run (naming the phase and the last checkpoint) when a task boundary, an optimizer
      step (the first one includes compiling it) or a checkpoint save makes no progress for this long; 0 turns
      the watchdog off. Evaluation is not timed.
    max_truncated_share: largest share of a split's prompts (or targets) that ``max_length``
      (``max_target_length``) may cut; above it the run refuses to start. Any cut is reported as a note.
  """

  epochs: int = 1
  steps_per_task: int | None = None
  batch_size: int = 8
  max_length: int = 512
  max_target_length: int = 16
  bf16_compute: bool = False
  seed: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  log_every: int = 10
  progress: bool = True
  watchdog_seconds: float = 3600.0
  max_truncated_share: float = 0.9


@dataclasses.dataclass
class EvalConfig:
  """Evaluation after each task (greedy decoding with the KV cache, exact match after normalisation).

  Attributes:
    batch_size: rows per generation batch.
    max_new_tokens: tokens generated per example (labels are short).
    initial: also evaluate the model before any training (the baseline of FWT).
    rank_classification: also score every task that has a label set by rank classification (the label option
      with the highest likelihood; ``R_rank`` in results.json).
    invariant_check: measure ``||U^T dW|| / ||dW||`` and ``||dW V|| / ||dW||`` per constrained matrix and task.
  """

  batch_size: int = 32
  max_new_tokens: int = 16
  initial: bool = True
  rank_classification: bool = True
  invariant_check: bool = True


@dataclasses.dataclass
class MeshConfig:
  """Device mesh sizes (``clsvd_jax.parallel.make_mesh``; -1 = the rest of the devices)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1


@dataclasses.dataclass
class DistributedConfig:
  """Several processes (hosts) through ``jax.distributed`` (``clsvd_jax.parallel.distributed_config``).

  With the defaults nothing needs setting: a TPU pod, a SLURM / Open MPI job or ``JAX_COORDINATOR_ADDRESS`` (with
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) in the environment start it; anything else runs as one process.

  Attributes:
    enabled: ``auto`` (the environment decides), true (always; JAX auto-detects the cluster unless the fields
      below say more) or false (never).
    coordinator_address, num_processes, process_id, local_device_ids, initialization_timeout: passed to
      ``jax.distributed.initialize`` when set.
  """

  enabled: bool | Literal["auto"] = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: list[int] | None = None
  initialization_timeout: int | None = None

  def init_kwargs(self) -> dict[str, Any]:
    """The mapping ``clsvd_jax.parallel.distributed_config`` reads (unset fields left out)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class RunConfig:
  """A whole run: model, task stream, method and its options, optimizer, training, evaluation, outputs.

  Attributes:
    model: see ``ModelConfig``.
    tasks: the task stream, each entry a ``clsvd_jax.data.TaskSpec`` mapping (validated by the data package).
    method: ``osft`` (ours), ``seqft`` (plain sequential full fine-tuning), ``mtl`` (all tasks at once), the
      baselines ``replay``, ``ewc``, ``lora``, ``olora``, ``gpm``, ``pertask``, or any method registered with
      ``clsvd_jax.train.register_method``.
    osft: options of the constrained method and the parameter policy.
    replay, ewc, lora, gpm: options of those methods (``lora`` also for ``olora``); read only by them.
    optimizer: see ``OptimizerConfig``.
    training: see ``TrainingConfig``.
    eval: see ``EvalConfig``.
    run_dir: output folder (results, plots, TensorBoard log, checkpoints); relative to the working directory.
    data_dir: folder that relative task paths are relative to (default the config file's folder).
    mesh: device mesh (``null``: one device; with several processes, every device on ``fsdp``).
    distributed: how several processes find each other (see ``DistributedConfig``).
    name: a label for tables and plots.
  """

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  tasks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  method: str = "osft"
  osft: OsftConfig = dataclasses.field(default_factory=OsftConfig)
  replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)
  ewc: EwcConfig = dataclasses.field(default_factory=EwcConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  gpm: GpmConfig = dataclasses.field(default_factory=GpmConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  run_dir: str = "runs/run"
  data_dir: str | None = None
  mesh: MeshConfig | None = None
  name: str | None = None
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

  def to_dict(self) -> dict[str, Any]:
    """A plain dict (YAML / JSON serialisable) that ``from_dict`` reads back to an equal config."""
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
  origin = typing.get_origin(tp)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if origin in (list, Sequence):
    (inner,) = typing.get_args(tp) or (Any,)
    return f"a list of {_type_name(inner)}"
  if origin in (dict, Mapping):
    return "a mapping"
  if dataclasses.is_dataclass(tp):
    return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
  if tp is type(None):
    return "null"
  if tp is Any:
    return "any value"
  return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
  """Checks ``value`` against the type hint ``tp`` and converts it (nested dataclasses, int -> float)."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _convert(value, arg, where)
      except ConfigError as e:
        errors.append(e)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
  if origin is Literal:
    allowed = typing.get_args(tp)
    if value in allowed and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)):
      return value
    raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}")
  if dataclasses.is_dataclass(tp):
    return _from_dict(tp, value, where)
  if origin in (list, Sequence):
    if not isinstance(value, list | tuple):
      raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    (inner,) = typing.get_args(tp) or (Any,)
    return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
  if origin in (dict, Mapping):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return dict(value)
  if tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    if isinstance(value, int | float) and not isinstance(value, bool):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  else:
    raise TypeError(f"config schema: unsupported type {tp!r} at {where}")
  raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _from_dict(cls: type, data: Any, where: str) -> Any:
  if data is None:
    data = {}
  if not isinstance(data, Mapping):
    raise ConfigError(f"{where or 'config'}: expected {_type_name(cls)}, got {type(data).__name__} {data!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields), key=str)
  if unknown:
    key = unknown[0]
    prefix = f"{where}." if where else ""
    raise ConfigError(f"{prefix}{key}: unknown key; allowed keys{' in ' + where if where else ''}: "
                      f"{', '.join(fields)}")
  kwargs = {}
  for name, value in data.items():
    kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
  return cls(**kwargs)


def _floats(node: Any, where: str) -> list[tuple[str, float]]:
  """``(key path, value)`` of every float field of a config (nested sections included)."""
  out = []
  for f in dataclasses.fields(node):
    value = getattr(node, f.name)
    key = f"{where}.{f.name}" if where else f.name
    if dataclasses.is_dataclass(value):
      out.extend(_floats(value, key))
    elif isinstance(value, float):
      out.append((key, value))
  return out


def _check(config: RunConfig, source: str) -> None:
  """Cross-field checks the types cannot express."""

  def fail(key: str, msg: str) -> None:
    raise ConfigError(f"{source}: {key}: {msg}")

  for key, value in _floats(config, ""):
    if not math.isfinite(value):
      fail(key, f"must be a finite number, got {value}")

  if config.method not in METHODS:
    fail("method", f"unknown method {config.method!r}; registered methods: {', '.join(sorted(METHODS))}")
  try:
    parse_task_specs(config.tasks)
  except DataError as e:
    raise ConfigError(f"{source}: {e}") from None
  m = config.model
  if m.path is None and m.config is None:
    fail("model", "give either model.path (a Hugging Face checkpoint directory) or model.config (an inline config "
                  "of a model built from scratch)")
  if m.path is not None and m.config is not None:
    fail("model", "model.path and model.config are exclusive: a checkpoint brings its own config.json")
  if m.path is None and m.tokenizer is None:
    fail("model.tokenizer", "an inline model needs a tokenizer: 'byt5' or a tokenizer directory")
  rp = config.osft.rank_policy
  if not 0.0 <= rp.mrr <= rp.trr <= 1.0:
    fail("osft.rank_policy", f"need 0 <= mrr <= trr <= 1, got mrr={rp.mrr}, trr={rp.trr}")
  if not 0.0 <= rp.eps <= 1.0:
    fail("osft.rank_policy.eps", f"must lie in [0, 1], got {rp.eps}")
  if not 0.0 < config.osft.max_rank_ratio <= 1.0:
    fail("osft.max_rank_ratio", f"must lie in (0, 1], got {config.osft.max_rank_ratio}")
  if config.osft.basis_source == "activations" and config.osft.start_protecting_from == 1:
    fail("osft.basis_source", "'activations' takes its directions from finished tasks, and before the first task "
                              "there is none: set osft.start_protecting_from: 2 (or basis_source: weights)")
  positive = {"training.batch_size": config.training.batch_size, "training.epochs": config.training.epochs,
              "training.max_length": config.training.max_length,
              "training.max_target_length": config.training.max_target_length,
              "optimizer.grad_accum": config.optimizer.grad_accum, "eval.batch_size": config.eval.batch_size,
              "eval.max_new_tokens": config.eval.max_new_tokens,
              "osft.calibration_batches": config.osft.calibration_batches,
              "training.keep_checkpoints": config.training.keep_checkpoints}
  for key, value in positive.items():
    if value < 1:
      fail(key, f"must be a positive integer, got {value}")
  if config.training.steps_per_task is not None and config.training.steps_per_task < 1:
    fail("training.steps_per_task", f"must be a positive integer or null, got {config.training.steps_per_task}")
  if config.training.batch_size % config.optimizer.grad_accum:
    fail("optimizer.grad_accum", f"training.batch_size={config.training.batch_size} must be divisible by "
                                 f"grad_accum={config.optimizer.grad_accum} (each micro-batch gets an equal share)")
  if config.optimizer.lr <= 0:
    fail("optimizer.lr", f"must be positive, got {config.optimizer.lr}")
  for key in ("checkpoint_every", "log_every", "watchdog_seconds"):
    if getattr(config.training, key) < 0:
      fail(f"training.{key}", f"must be >= 0, got {getattr(config.training, key)}")
  if not 0.0 <= config.training.max_truncated_share <= 1.0:
    fail("training.max_truncated_share", f"must lie in [0, 1], got {config.training.max_truncated_share}")
  if config.osft.min_trainable < 0:
    fail("osft.min_trainable", f"must be >= 0, got {config.osft.min_trainable}")
  _check_method_sections(config, fail)
  dist = config.distributed
  if dist.num_processes is not None and dist.num_processes < 1:
    fail("distributed.num_processes", f"must be a positive integer, got {dist.num_processes}")
  if dist.process_id is not None and not 0 <= dist.process_id < (dist.num_processes or dist.process_id + 1):
    fail("distributed.process_id", f"must lie in [0, num_processes), got {dist.process_id}")
  if dist.initialization_timeout is not None and dist.initialization_timeout < 1:
    fail("distributed.initialization_timeout", f"must be a positive number of seconds, got "
                                               f"{dist.initialization_timeout}")


def _check_method_sections(config: RunConfig, fail: Any) -> None:
  """Ranges of the baselines' options (checked whatever the method, so a typo never waits for the method that
  reads it)."""
  rep, ewc, lora, gpm = config.replay, config.ewc, config.lora, config.gpm
  if rep.memory_per_task < 0:
    fail("replay.memory_per_task", f"must be >= 0, got {rep.memory_per_task}")
  if not 0.0 <= rep.ratio < 1.0:
    fail("replay.ratio", f"must lie in [0, 1) (some rows of every batch come from the current task), got {rep.ratio}")
  if ewc.lam < 0:
    fail("ewc.lam", f"must be >= 0, got {ewc.lam}")
  if not 0.0 <= ewc.decay <= 1.0:
    fail("ewc.decay", f"must lie in [0, 1], got {ewc.decay}")
  if ewc.fisher_batches < 1:
    fail("ewc.fisher_batches", f"must be a positive integer, got {ewc.fisher_batches}")
  if ewc.fisher_batch_size is not None and ewc.fisher_batch_size < 1:
    fail("ewc.fisher_batch_size", f"must be a positive integer or null, got {ewc.fisher_batch_size}")
  if lora.rank < 1:
    fail("lora.rank", f"must be a positive integer, got {lora.rank}")
  for key in ("alpha", "lambda1", "lambda2"):
    if getattr(lora, key) < 0:
      fail(f"lora.{key}", f"must be >= 0, got {getattr(lora, key)}")
  if lora.targets is not None:
    if not lora.targets:
      fail("lora.targets", "is empty; give regexes of the adapted matrices' paths, or null for the default (query "
                           "and value projections)")
    for i, pattern in enumerate(lora.targets):
      try:
        re.compile(pattern)
      except re.error as e:
        fail(f"lora.targets[{i}]", f"{pattern!r} is not a valid regex: {e}")
  if not 0.0 < gpm.eps <= 1.0:
    fail("gpm.eps", f"must lie in (0, 1], got {gpm.eps}")
  if gpm.max_rank_ratio is not None and not 0.0 < gpm.max_rank_ratio <= 1.0:
    fail("gpm.max_rank_ratio", f"must lie in (0, 1] or be null, got {gpm.max_rank_ratio}")


def from_dict(data: Mapping[str, Any], source: str = "config") -> RunConfig:
  """Validates a config mapping and returns the ``RunConfig``.

  Args:
    data: the parsed YAML.
    source: how to name the origin in messages (the file path).

  Raises:
    ConfigError: naming the source, the key path and what is allowed there.
  """
  try:
    config = _from_dict(RunConfig, data, "")
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None
  _check(config, source)
  return config


def parse_override(text: str) -> tuple[list[str], Any]:
  """Splits ``a.b.c=value`` into the key path and the YAML-parsed value.

  Raises:
    ConfigError: without ``=`` or with an empty key.
  """
  if "=" not in text:
    raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. --set training.seed=3")
  key, raw = text.split("=", 1)
  parts = key.strip().split(".")
  if not all(parts):
    raise ConfigError(f"--set {text!r}: empty key in {key!r}")
  try:
    value = yaml.safe_load(raw) if raw.strip() else None
  except yaml.YAMLError as e:
    raise ConfigError(f"--set {text!r}: the value is not valid YAML: {e}") from None
  return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """A copy of ``data`` with every ``key.path=value`` override applied (intermediate mappings are created).

  Keys are not checked here; ``from_dict`` rejects an unknown one with the allowed keys. A numeric key indexes
  a list (``--set tasks.0.max_train=100``).
  """
  out = copy.deepcopy(dict(data))
  for text in overrides:
    parts, value = parse_override(text)
    node: Any = out
    for i, part in enumerate(parts[:-1]):
      where = ".".join(parts[:i + 1])
      if isinstance(node, list):
        node = _list_item(node, part, where, text)
        continue
      child = node.get(part)
      if child is None:
        child = node[part] = {}
      if not isinstance(child, dict | list):
        raise ConfigError(f"--set {text!r}: {where} is {child!r}, not a mapping")
      node = child
    last = parts[-1]
    if isinstance(node, list):
      idx = _index(node, last, ".".join(parts), text)
      node[idx] = value
    else:
      node[last] = value
  return out


def _index(items: list, part: str, where: str, text: str) -> int:
  if not part.isdigit() or int(part) >= len(items):
    raise ConfigError(f"--set {text!r}: {where}: {part!r} is not an index of a list of {len(items)} entries")
  return int(part)


def _list_item(items: list, part: str, where: str, text: str) -> Any:
  return items[_index(items, part, where, text)]


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
  """Reads a YAML config, applies ``--set`` overrides and validates it.

  Relative task paths are resolved against ``data_dir`` (default: the config file's folder).

  Raises:
    ConfigError: a missing file, invalid YAML, or anything ``from_dict`` rejects (naming the file).
  """
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} not found")
  try:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML: {e}") from None
  if not isinstance(data, Mapping):
    sections = ", ".join(f.name for f in dataclasses.fields(RunConfig))
    raise ConfigError(f"{path}: expected a mapping of sections ({sections}), got {type(data).__name__}")
  data = apply_overrides(data, overrides)
  config = from_dict(data, str(path))
  if config.data_dir is None:
    config.data_dir = str(path.resolve().parent)
  return config


def dump_config(config: RunConfig, path: str | os.PathLike[str]) -> None:
  """Writes a config as YAML (what ``load_config`` reads back) to a local path or a URL (``gs://...``)."""
  epath.Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
