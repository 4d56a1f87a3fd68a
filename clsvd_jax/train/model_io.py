"""The runner's view of a model: build it from the config, and the functional interface of its family.

Everything goes through ``clsvd_jax.models`` (``from_pretrained``, ``init_from_config``, ``functional``,
``update_model``, ``generate``, ``block_hidden_states``, ``constrained_matrices``). Where the package-level entry
point is not available yet, the family module (``clsvd_jax.models.t5`` / ``clsvd_jax.models.llama``) provides the
same functions.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from clsvd_jax.config import ConfigError, ModelConfig

# Model kind per family: how batches are laid out (clsvd_jax.data.KINDS).
KIND_BY_FAMILY = {"t5": "encoder_decoder", "llama": "decoder"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The dtype of the parameters the optimizer updates, whatever ``model.dtype`` the weights were read in.
MASTER_DTYPE = jnp.float32


def _models_package() -> Any:
  return importlib.import_module("clsvd_jax.models")


def _family_module(family: str) -> Any:
  try:
    return importlib.import_module(f"clsvd_jax.models.{family}")
  except ModuleNotFoundError as e:
    raise ConfigError(f"model family {family!r} is not available in this installation ({e})") from None


def family_of(model: Any) -> str:
  """``t5`` or ``llama``, from the model's config."""
  config = getattr(model, "config", None)
  name = type(config).__name__.lower() if config is not None else type(model).__name__.lower()
  for family in KIND_BY_FAMILY:
    if family in name:
      return family
  model_type = getattr(config, "model_type", None)
  if model_type in KIND_BY_FAMILY:
    return model_type
  raise ValueError(f"cannot tell the family of model {type(model).__name__}; expected one of {sorted(KIND_BY_FAMILY)}")


def kind_of(model: Any) -> str:
  """``encoder_decoder`` (T5) or ``decoder`` (LLaMA)."""
  return KIND_BY_FAMILY[family_of(model)]


def _api(model: Any, name: str) -> Callable[..., Any]:
  """``clsvd_jax.models.<name>`` when the package exports it, else the model family's own function."""
  fn = getattr(_models_package(), name, None)
  if fn is None:
    fn = getattr(_family_module(family_of(model)), name, None)
  if fn is None:
    raise NotImplementedError(f"clsvd_jax.models has no {name!r} for the {family_of(model)} family")
  return fn


def functional(model: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
  """``(apply_fn, params)`` of the model (pure, jittable apply)."""
  return _api(model, "functional")(model)


def update_model(model: Any, params: Mapping[str, Any]) -> None:
  """Writes ``params`` back into the model in place."""
  _api(model, "update_model")(model, params)


def generate(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int,
             eos_token_id: int | None = None) -> Any:
  """Greedy decoding with the KV cache; returns the new tokens ``[B, max_new_tokens]``."""
  return _api(model, "generate")(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_token_id)


def block_hidden_states(model: Any, batch: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Inputs and outputs of every block for one training-layout batch, ``{stack: (in, out)}`` ``[L, B, T, D]``."""
  fn = _api(model, "block_hidden_states")
  if kind_of(model) == "encoder_decoder":
    return fn(model, batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
              batch["decoder_attention_mask"])
  return fn(model, batch["input_ids"], batch["attention_mask"])


def token_mask_for_stack(stack: str, batch: Mapping[str, Any]) -> Any:
  """The non-pad mask ``[B, T]`` of the tokens a stack of blocks sees."""
  if stack.startswith("decoder") and "decoder_attention_mask" in batch:
    return batch["decoder_attention_mask"]
  return batch["attention_mask"]


def constrained_matrices(model: Any) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the attention and MLP matrices."""
  return dict(_api(model, "constrained_matrices")(model))


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
  drops most updates at small learning rates (DESIGN 6b; ``tests/train/test_master_weights.py``). The cast is exact
  (bf16 and float16 values are float32 values); bf16 compute is the train step's ``bf16_compute``. The float32
  copy is real memory: ``clsvd inspect --memory`` counts it.
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
  models = _models_package()
  if cfg.path is not None:
    path = _resolve(cfg.path, base_dir)
    loader = getattr(models, "from_pretrained", None)
    if loader is None:
      raise ConfigError(f"model.path={cfg.path}: clsvd_jax.models.from_pretrained is not available in this "
                        "installation")
    out = loader(str(path), dtype=dtype)
    return out[0] if isinstance(out, tuple) else out
  config = dict(cfg.config or {})
  init = getattr(models, "init_from_config", None)
  if init is not None:
    try:
      return init({**config, "model_type": config.get("model_type", cfg.family)}, seed=cfg.init_seed, dtype=dtype)
    except (ValueError, KeyError) as e:
      raise ConfigError(f"model.config: {e}") from None
  family = _family_module(cfg.family)
  if cfg.family == "t5":
    try:
      hf = {"model_type": "t5", **config}
      parsed = family.config_from_hf(hf, source="model.config")
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"model.config: {e}") from None
    return family.init(parsed, seed=cfg.init_seed, dtype=dtype)
  init_fn = getattr(family, "init_from_config", None) or getattr(family, "init", None)
  if init_fn is None:
    raise ConfigError(f"model.family={cfg.family}: this installation cannot build it from an inline config")
  parsed = family.config_from_hf({"model_type": cfg.family, **config}) if hasattr(family, "config_from_hf") else config
  return init_fn(parsed, seed=cfg.init_seed, dtype=dtype)


def load_tokenizer(cfg: ModelConfig, *, base_dir: str | Path | None = None) -> Any:
  """The tokenizer of the config: ``byt5`` (no files) or ``AutoTokenizer`` from a directory."""
  import transformers

  name = cfg.tokenizer or cfg.path
  if name is None:
    raise ConfigError("model.tokenizer: not set and no model.path to read a tokenizer from")
  if name.lower() == "byt5":
    return transformers.ByT5Tokenizer()
  path = _resolve(name, base_dir)
  if not path.exists():
    raise ConfigError(f"model.tokenizer={name}: no such directory ({path}); give 'byt5' or a tokenizer folder")
  return transformers.AutoTokenizer.from_pretrained(str(path))


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
