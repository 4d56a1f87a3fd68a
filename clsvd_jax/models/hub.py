"""Local checkpoint directories or Hugging Face Hub ids, resolved to a local directory."""

from __future__ import annotations

from pathlib import Path

# What a model needs from a hub repository: its config, weights and tokenizer (not .bin / .h5 / .msgpack copies).
ALLOW_PATTERNS = (
  "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
  "special_tokens_map.json", "*.model", "*.tiktoken", "vocab.*", "merges.txt", "added_tokens.json",
  "chat_template.*",
)


class HubError(OSError):
  """A model id that could not be resolved to a local checkpoint directory."""


def _looks_like_path(name: str) -> bool:
  return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def resolve(path_or_id: str | Path, *, revision: str | None = None) -> Path:
  """A local checkpoint directory for a directory path or a Hugging Face Hub model id.

  Args:
    path_or_id: an existing directory (returned as is), or a hub id such as ``"meta-llama/Llama-3.1-8B"``,
      downloaded (config, safetensors and tokenizer files only) with ``huggingface_hub.snapshot_download`` into its
      cache, which also serves it offline once downloaded.
    revision: hub branch, tag or commit.

  Raises:
    HubError: a path that does not exist, or an id that cannot be downloaded (offline, unknown, gated): the message
      names the id and says to pass a local directory instead.
  """
  p = Path(path_or_id).expanduser()
  if p.is_dir():
    return p
  name = str(path_or_id)
  if isinstance(path_or_id, Path) or _looks_like_path(name) or p.exists():
    raise HubError(f"{name}: no such checkpoint directory; pass a directory holding config.json and "
                   "model.safetensors, or a Hugging Face Hub id like 'org/model'")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
    raise HubError(f"{name!r} is not a local directory and huggingface_hub is not installed to download it; pass a "
                   "local checkpoint directory (config.json + model.safetensors)") from None
  try:
    local = snapshot_download(repo_id=name, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
  except Exception as e:  # offline, unknown repo, gated repo, bad id: all end the same way for the user
    raise HubError(f"could not get model {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). It is not a "
                   "local directory either: pass the path of a local checkpoint directory (config.json + "
                   "model.safetensors), or go online / log in (huggingface-cli login) for gated models") from None
  return Path(local)
