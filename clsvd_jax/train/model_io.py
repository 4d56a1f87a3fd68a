"""The runner's view of a model: build it from the config, and the functional interface of its family.

Everything goes through ``clsvd_jax.models`` (``from_pretrained``, ``init_from_config``, ``functional``,
``update_model``, ``generate``, ``block_hidden_states``, ``constrained_matrices``), which dispatches to the model's
family; this module adds the runner's batch layout and its config errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from clsvd_jax import models
from clsvd_jax.config import ConfigError, ModelConfig
from clsvd_jax.data.prompts import build_prompt
from clsvd_jax.data.sources import TaskData

# Model kind per family: how batches are laid out (clsvd_jax.data.KINDS).
KIND_BY_FAMILY = {"t5": "encoder_decoder", "llama": "decoder"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.tokenizer value: a byte-level BPE learnt from the stream's training text (train_bpe_tokenizer).
BPE = "bpe"
# The dtype of the parameters the optimizer updates, whatever ``model.dtype`` the weights were read in.
MASTER_DTYPE = jnp.float32


def family_of(model: Any) -> str:
  """``t5`` or ``llama``: the name of the model's family package in ``clsvd_jax.models``."""
  return models.family_of(model).__name__.rpartition(".")[2]


def kind_of(model: Any) -> str:
  """``encoder_decoder`` (T5) or ``decoder`` (LLaMA)."""
  return KIND_BY_FAMILY[family_of(model)]


def functional(model: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
  """``(apply_fn, params)`` of the model (pure, jittable apply)."""
  return models.functional(model)


def update_model(model: Any, params: Mapping[str, Any]) -> None:
  """Writes ``params`` back into the model in place."""
  models.update_model(model, params)


def generate(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int,
             eos_token_id: int | None = None) -> Any:
  """Greedy decoding with the KV cache; returns the new tokens ``[B, max_new_tokens]``."""
  return models.generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id)


def block_hidden_states(model: Any, batch: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Inputs and outputs of every block for one training-layout batch, ``{stack: (in, out)}`` ``[L, B, T, D]``."""
  if kind_of(model) == "encoder_decoder":
    return models.block_hidden_states(model, batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                                      batch["decoder_attention_mask"])
  return models.block_hidden_states(model, batch["input_ids"], batch["attention_mask"])


def token_mask_for_stack(stack: str, batch: Mapping[str, Any]) -> Any:
  """The non-pad mask ``[B, T]`` of the tokens a stack of blocks sees."""
  if stack.startswith("decoder") and "decoder_attention_mask" in batch:
    return batch["decoder_attention_mask"]
  return batch["attention_mask"]


def constrained_matrices(model: Any) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the attention and MLP matrices."""
  return dict(models.constrained_matrices(model))


def build_model(cfg: ModelConfig, *, base_dir: str | Path | None = None) -> Any:
  """The model of the config with float32 master weights (``to_master_weights``): a checkpoint (``path``) read in
  ``cfg.dtype``, or a random model from an inline ``config`` initialised in ``cfg.dtype``.

  Raises:
    ConfigError: naming ``model.path`` / ``model.config`` when it cannot be built.
  """
  return to_master_weights(_build(cfg, base_dir))


def to_master_weights(model: Any) -> Any:
  """Casts the model's floating parameters to ``MASTER_DTYPE`` (float32) in place and returns it.

  The optimizer updates these parameters directly, so they must hold float32: a bf16 parameter rounds every
  update to 8 bits of mantissa, which moves the protected directions (``||U^T dW|| / ||dW||`` = 0.47 measured) and
  drops most updates at small learning rates (docs/design.md §6b; ``tests/train/test_master_weights.py``). The cast
  is exact (bf16 and float16 values are float32 values); bf16 compute is the train step's ``bf16_compute``. The
  float32 copy is real memory: ``clsvd inspect --memory`` counts it.
  """
  _, params = functional(model)
  leaves = jax.tree.leaves(params)
  if all(leaf.dtype == MASTER_DTYPE or not jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
    return model
  # While casting, the low-precision parameters and their float32 copy both exist (1.5x the float32 bytes).
  update_model(model, jax.tree.map(
      lambda x: x.astype(MASTER_DTYPE) if jnp.issubdtype(x.dtype, jnp.floating) else x, params))
  return model


def _build(cfg: ModelConfig, base_dir: str | Path | None) -> Any:
  dtype = _DTYPES[cfg.dtype]
  if cfg.path is not None:
    return models.from_pretrained(str(_resolve(cfg.path, base_dir)), dtype=dtype)
  config = dict(cfg.config or {})
  try:
    return models.init_from_config({**config, "model_type": config.get("model_type", cfg.family)},
                                   seed=cfg.init_seed, dtype=dtype)
  except (ValueError, KeyError) as e:
    raise ConfigError(f"model.config: {e}") from None


def load_tokenizer(cfg: ModelConfig, *, base_dir: str | Path | None = None,
                   tasks: Sequence[TaskData] | None = None) -> Any:
  """The tokenizer of the config: ``byt5`` (no files), ``bpe`` (learnt from ``tasks``, see ``train_bpe_tokenizer``)
  or ``AutoTokenizer`` from a directory.

  Raises:
    ConfigError: naming ``model.tokenizer`` when it cannot be loaded.
  """
  import transformers

  name = cfg.tokenizer or cfg.path
  if name is None:
    raise ConfigError("model.tokenizer: not set and no model.path to read a tokenizer from")
  if name.lower() == "byt5":
    return transformers.ByT5Tokenizer()
  if name.lower() == BPE:
    if cfg.path is not None:
      raise ConfigError(f"model.tokenizer={name}: a tokenizer learnt from the stream's text only suits a model "
                        f"built from model.config; the checkpoint {cfg.path} needs its own tokenizer (drop "
                        "model.tokenizer to read it from model.path)")
    if tasks is None:
      raise ConfigError(f"model.tokenizer={name}: learnt from the training text, which was not given")
    return train_bpe_tokenizer(tokenizer_corpus(tasks), cfg.tokenizer_vocab_size)
  path = _resolve(name, base_dir)
  if not path.exists():
    raise ConfigError(f"model.tokenizer={name}: no such directory ({path}); give 'byt5', 'bpe' or a tokenizer "
                      "folder")
  return transformers.AutoTokenizer.from_pretrained(str(path))


def tokenizer_corpus(tasks: Sequence[TaskData]) -> list[str]:
  """The text a ``bpe`` tokenizer learns from: every training prompt and answer of the stream, in stream order
  (never the evaluation splits)."""
  return [text for data in tasks for ex in data.train for text in (build_prompt(data.task, ex), ex.answer)]


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
  """A byte-level BPE tokenizer with ``vocab_size`` entries learnt from ``texts`` (``<pad>`` = 0, ``</s>`` = 1).

  For a model trained from scratch on a CPU: ByT5's bytes make every word a sequence the model must first learn to
  assemble, and make prompts about 3x longer (cpu_small's samples: median 322 bytes, 99 BPE tokens). Byte-level
  BPE keeps ByT5's properties that matter here: no unknown tokens, and decoding returns the exact text. Training is
  deterministic (same texts, same vocabulary), so ``clsvd eval`` and ``--resume`` rebuild the run's tokenizer.

  Raises:
    ConfigError: when ``vocab_size`` cannot hold the 256 byte symbols and the special tokens.
  """
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 2:
    raise ConfigError(f"model.tokenizer_vocab_size={vocab_size}: a byte-level BPE needs at least "
                      f"{len(alphabet) + 2} entries (256 bytes, <pad>, </s>)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"], initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def check_vocab(model: Any, tokenizer: Any) -> None:
  """Raises a ``ConfigError`` when the tokenizer produces ids the model has no embedding for."""
  vocab = getattr(model.config, "vocab_size", None)
  if vocab is not None and len(tokenizer) > vocab:
    raise ConfigError(f"model.config.vocab_size={vocab} but the tokenizer has {len(tokenizer)} tokens; set "
                      f"vocab_size >= {len(tokenizer)}")


def _resolve(path: str, base_dir: str | Path | None) -> Path:
  p = Path(path).expanduser()
  if not p.is_absolute() and base_dir is not None and not p.exists():
    p = Path(base_dir) / p
  return p


def model_config_dict(model: Any) -> dict[str, Any]:
  """The model's parsed config as a JSON-friendly dict (for results.json)."""
  config = model.config
  if dataclasses.is_dataclass(config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}
  return dict(getattr(config, "__dict__", {}))
