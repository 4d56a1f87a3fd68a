"""Side by side with the peer: PEFT's OSF tuner on transformers' LLaMA vs ``constrained(adamw)`` on ours.

One run, one machine, the same architecture for both frameworks: LLaMA with hidden 256, intermediate 688, 8 layers,
4 query / 4 key-value heads of 64, vocabulary 1024, untied head, float32; a batch of 16 x 256 random token ids;
causal-LM loss (mean next-token cross entropy); AdamW lr 1e-3, weight decay 0.01, betas (0.9, 0.999), eps 1e-8.
The targeted matrices are the attention (q, k, v, o) and MLP (gate, up, down) weights of every layer.

Each framework is compared with ITS OWN plain full fine-tuning (every parameter trained, plain AdamW), the only
fair comparison across frameworks:

* PyTorch: ``LlamaForCausalLM`` plain vs ``peft.get_peft_model(model, OSFConfig(effective_rank=f))``: the top
  ``f`` of each targeted matrix's singular directions preserved, the rest trained as the factors
  ``U_low, S_low, V_low`` whose gradients PEFT projects in hooks; everything else frozen.
* JAX: ``models.init_from_config`` LLaMA with plain ``optax.adamw`` vs ``clsvd_jax.constrained(adamw)`` with the
  top ``f`` directions of each targeted matrix protected (``compute_subspaces``) and bases sized for that rank
  (``max_rank_ratio=f``); the other parameters frozen, as PEFT freezes them (and as ``osft`` does on a pretrained
  checkpoint).

Protocol: every setting starts from the same weights; one warm-up step each (JAX compiles there), then ``--steps``
rounds, each one plain step followed by one step of every protected fraction, so machine noise hits them alike; the
step ratio of a fraction is the median (and interquartile range) over rounds of its step time over the plain step
of the same round. Each framework runs in its own process (thread pools never meet).

Columns:

* ``step``: step-time ratio over the framework's plain fine-tuning.
* ``memory``: bytes of everything training holds, over the bytes of the targeted matrices: parameters (frozen and
  trained, PEFT's factors included), gradients of the trained ones, optimizer state (Adam's moments; our bases),
  buffers (PEFT's frozen ``*_init`` factors and ``U_high``/``V_high``). Activations are left out (the same model).
* ``leak``: ``max ||U^T dW||_F / ||dW||_F`` over targeted matrices after the ``--steps`` AdamW steps, ``dW`` the
  change of the effective weight (PEFT: ``W + get_delta_weight``) and ``U`` the protected left basis the method
  uses (PEFT's top-k left singular vectors of the initial W; ours as stored). Computed in float64 by one function
  for both. ``leak_right`` (JSON only) is ``||dW V|| / ||dW||``.
* ``setup``: seconds to set up protection (``get_peft_model``; our ``compute_subspaces`` + ``set_subspaces``,
  first call including compilation, and ``setup_warm_s`` of a second call in the JSON).

Measured once on the project's 2-core CPU machine before this script existed (issue 9): PEFT OSF 2.77x / 1.87x /
1.03x its plain fine-tuning, memory 8.3x / 5.4x / 2.5x the targeted weights (plain: 4.3x), leak 0.067-0.103.
Targets for ours: step <= 1.10x at every fraction, memory below PEFT's at 10% and 50% and within plain + 1x at 90%,
leak <= 1e-5.

Why the memory looks as it does (targeted matrices = 1x; the embedding and head add 0.083x of frozen or trained
parameters): plain = 4 x 1.083 = 4.33x (weights, gradients, two moments). Ours = 1.083x weights + 1x gradients + 2x
moments + the bases: ``m c_l + n c_r`` floats per matrix with ``c = min(dim // 2, ceil(f min(m, n)))`` per side,
i.e. 2f per square matrix up to f = 1/2 and 1x beyond; PEFT's = the frozen base (1x) + the trainable factors
``U_low [m, r], S_low, V_low [r, n]`` with r = (1 - f) min(m, n) four times (values, gradients, two moments) + the
frozen ``*_init`` copies + ``U_high``/``V_high`` on the long side: it grows as (1 - f), ours as f (capped).

Usage::

  python benchmarks/peers.py                 # the full setting (about 15 minutes on 2 CPU cores)
  python benchmarks/peers.py --quick         # a tiny model, 3 steps: a smoke test (seconds)
  python benchmarks/peers.py --json          # JSON lines instead of the markdown table

The peer needs ``pip install -e '.[bench]'`` (peft and torch); without it the PyTorch rows are skipped with that
advice on stderr.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FRACTIONS = (0.1, 0.5, 0.9)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INSTALL_HINT = "the peer is not installed: pip install -e '.[bench]'  (or: pip install peft==0.21.2 torch==2.13.0)"


@dataclasses.dataclass(frozen=True)
class Setting:
  """Architecture and batch of one comparison."""

  hidden: int = 256
  intermediate: int = 688
  layers: int = 8
  heads: int = 4
  head_dim: int = 64
  vocab: int = 1024
  batch: int = 16
  length: int = 256
  lr: float = 1e-3
  weight_decay: float = 0.01

  def hf_config(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` fields both frameworks build their model from."""
    return {"model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads, "head_dim": self.head_dim,
            "max_position_embeddings": max(self.length, 64), "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}

  def token_ids(self) -> np.ndarray:
    return np.random.default_rng(0).integers(0, self.vocab, (self.batch, self.length), dtype=np.int64)


FULL = Setting()
QUICK = Setting(hidden=32, intermediate=86, layers=2, heads=2, head_dim=16, vocab=128, batch=2, length=16)


def leak_ratios(w0: np.ndarray, w1: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
  """``(||U^T dW|| / ||dW||, ||dW V|| / ||dW||)`` in float64 for one matrix (0 when it did not move)."""
  dw = np.asarray(w1, np.float64) - np.asarray(w0, np.float64)
  norm = np.linalg.norm(dw)
  if norm == 0:
    return 0.0, 0.0
  return (float(np.linalg.norm(np.asarray(u, np.float64).T @ dw) / norm),
          float(np.linalg.norm(dw @ np.asarray(v, np.float64)) / norm))


def summarize_ratios(ratios: list[float]) -> dict[str, Any]:
  q1, q3 = np.percentile(ratios, [25, 75])
  return {"step_ratio": round(statistics.median(ratios), 4), "step_ratio_q1_q3": [round(q1, 4), round(q3, 4)]}


def interleave(plain: Callable[[], float], protected: Mapping[float, Callable[[], float]],
               rounds: int) -> tuple[list[float], dict[float, list[float]]]:
  """Runs ``rounds`` of (one plain step, one step of every fraction); returns plain times and paired ratios."""
  plain_times, ratios = [], {f: [] for f in protected}
  for _ in range(rounds):
    t_plain = plain()
    plain_times.append(t_plain)
    for f, step in protected.items():
      ratios[f].append(step() / t_plain)
  return plain_times, ratios


# ---------------------------------------------------------------------------------------------------------------
# JAX: ours
# ---------------------------------------------------------------------------------------------------------------


def run_jax(setting: Setting, fractions: tuple[float, ...], steps: int) -> list[dict[str, Any]]:
  """Plain ``optax.adamw`` vs ``constrained(adamw)`` at each protected fraction (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  import optax

  import clsvd_jax as cj
  from clsvd_jax import models
  from clsvd_jax.models.llama.model import unflatten

  model = models.init_from_config(setting.hf_config(), seed=0)
  apply_fn, params = models.functional(model)
  flat0 = {p: np.asarray(w) for p, w in cj.flatten_with_paths(params).items()}
  targeted = sorted(models.constrained_matrices(model))
  target_bytes = sum(flat0[p].nbytes for p in targeted)
  ids = jnp.asarray(setting.token_ids(), jnp.int32)
  adamw = optax.adamw(setting.lr, weight_decay=setting.weight_decay)

  def loss_fn(train: dict, frozen: dict, x: jax.Array) -> jax.Array:
    logits = apply_fn(unflatten({**frozen, **train}), x)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), x[:, 1:]).mean()

  def make_step(tx: optax.GradientTransformation):
    def step(train, frozen, state, x):
      loss, grads = jax.value_and_grad(loss_fn)(train, frozen, x)
      updates, state = tx.update(grads, state, train)
      return optax.apply_updates(train, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 2))

  def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

  class Run:
    def __init__(self, train_paths: list[str], tx: optax.GradientTransformation, state: Any = None):
      self.train = {p: jnp.asarray(flat0[p]) for p in train_paths}
      self.frozen = {p: jnp.asarray(w) for p, w in flat0.items() if p not in self.train}
      self.state = tx.init(self.train) if state is None else state
      self.step_fn = make_step(tx)
      # Everything training holds: all weights, one gradient per trained weight, the optimizer state.
      self.memory = (tree_bytes(self.train) + tree_bytes(self.frozen) + tree_bytes(self.train)
                     + tree_bytes(self.state))

    def step(self) -> float:
      t0 = time.perf_counter()
      self.train, self.state, loss = self.step_fn(self.train, self.frozen, self.state, ids)
      jax.block_until_ready((self.train, self.state, loss))
      return time.perf_counter() - t0

  explicit_bases = jax.jit(lambda s: (cj.protected_basis(s, "left"), cj.protected_basis(s, "right")))
  plain = Run(list(flat0), adamw)
  protected, setup, bases = {}, {}, {}
  for f in fractions:
    tx = cj.constrained(adamw, max_rank_ratio=f)
    ranks = {p: int(f * min(flat0[p].shape[-2:])) for p in targeted}
    weights = {p: jnp.asarray(flat0[p]) for p in targeted}
    times = []
    for _ in range(2):  # the first call compiles; the second is what a later boundary of the same shapes costs
      t0 = time.perf_counter()
      subs = cj.compute_subspaces(weights, ranks, max_rank_ratio=f)
      state = cj.set_subspaces(tx.init(weights), subs)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
    setup[f] = times
    bases[f] = {p: tuple(np.asarray(b)[..., :ranks[p]] for b in explicit_bases(subs[p])) for p in targeted}
    protected[f] = Run(targeted, tx, state)

  for run in [plain, *protected.values()]:
    run.step()  # compile
  plain_times, ratios = interleave(plain.step, {f: r.step for f, r in protected.items()}, steps)

  rows = [{"framework": "jax", "method": "plain adamw", "protected": 0.0, "step_s": statistics.median(plain_times),
           "memory_ratio": plain.memory / target_bytes}]
  for f, run in protected.items():
    leaks = [leak_ratios(flat0[p][layer], np.asarray(run.train[p][layer]), u[layer], v[layer])
             for p, (u, v) in bases[f].items() for layer in range(flat0[p].shape[0])]
    rows.append({"framework": "jax", "method": "constrained(adamw)", "protected": f, **summarize_ratios(ratios[f]),
                 "memory_ratio": run.memory / target_bytes, "leak": max(lk for lk, _ in leaks),
                 "leak_right": max(lr for _, lr in leaks), "setup_s": setup[f][0], "setup_warm_s": setup[f][1]})
  return rows


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: the peer
# ---------------------------------------------------------------------------------------------------------------


def run_torch(setting: Setting, fractions: tuple[float, ...], steps: int) -> list[dict[str, Any]]:
  """transformers' ``LlamaForCausalLM`` plain vs PEFT ``OSFConfig`` at each preserved fraction."""
  import peft
  import torch
  import transformers
  from peft.tuners.osf.layer import OSFLayer

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = setting.hf_config()
  cfg.pop("model_type")
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa"))
  base.float()
  ids = torch.as_tensor(setting.token_ids())
  w0 = {name: m.weight.detach().clone() for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}
  target_bytes = sum(w.numel() * w.element_size() for w in w0.values())

  def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setting.lr,
                             weight_decay=setting.weight_decay, betas=(0.9, 0.999), eps=1e-8)

  def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

  def memory(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    # Parameters and buffers by storage (a tensor shared by two modules counts once), one gradient per trained
    # tensor, and the optimizer's state.
    held = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    trained = [p for p in model.parameters() if p.requires_grad]
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    return nbytes(held.values()) + nbytes(trained) + nbytes(state)

  class Run:
    def __init__(self, model: torch.nn.Module):
      self.model, self.opt = model, adamw(model)

    def step(self) -> float:
      t0 = time.perf_counter()
      loss = self.model(input_ids=ids, labels=ids).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      return time.perf_counter() - t0

  plain = Run(copy.deepcopy(base))
  protected, setup = {}, {}
  for f in fractions:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    model = peft.get_peft_model(model, peft.OSFConfig(effective_rank=f, target_modules=list(TARGETS)))
    setup[f] = time.perf_counter() - t0
    protected[f] = Run(model)

  for run in [plain, *protected.values()]:
    run.step()  # optimizer state exists from here on
  memories = {f: memory(r.model, r.opt) for f, r in protected.items()}
  plain_memory = memory(plain.model, plain.opt)
  plain_times, ratios = interleave(plain.step, {f: r.step for f, r in protected.items()}, steps)

  rows = [{"framework": "torch", "method": "plain AdamW", "protected": 0.0, "step_s": statistics.median(plain_times),
           "memory_ratio": plain_memory / target_bytes}]
  for f, run in protected.items():
    leaks = []
    with torch.no_grad():
      for name, m in run.model.named_modules():
        if not isinstance(m, OSFLayer):
          continue
        key = name.split("base_model.model.", 1)[-1]
        w_init = w0[key]
        w_now = m.get_base_layer().weight + m.get_delta_weight("default")
        k = m.effective_rank["default"]
        # The same decomposition PEFT took of the same initial weight (float32 SVD), so the same protected span.
        u, _, vt = torch.linalg.svd(w_init.float(), full_matrices=False)
        leaks.append(leak_ratios(w_init.numpy(), w_now.numpy(), u[:, :k].numpy(), vt[:k].T.numpy()))
    rows.append({"framework": "torch", "method": "peft OSF", "protected": f, **summarize_ratios(ratios[f]),
                 "memory_ratio": memories[f] / target_bytes, "leak": max(lk for lk, _ in leaks),
                 "leak_right": max(lr for _, lr in leaks), "setup_s": setup[f]})
  return rows


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def peer_available() -> bool:
  """Whether torch, transformers and a peft with the OSF tuner are installed (looked up, not imported: importing
  them takes seconds)."""
  specs = [importlib.util.find_spec(name) for name in ("peft", "torch", "transformers")]
  if any(s is None for s in specs):
    return False
  return any((Path(root) / "tuners" / "osf").is_dir() for root in specs[0].submodule_search_locations or ())


def markdown(rows: list[dict[str, Any]]) -> str:
  """The comparison as one markdown table."""
  lines = ["| framework | method | protected | step ratio [IQR] | memory / targeted | leak | setup s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "step_ratio" in r:
      q1, q3 = r["step_ratio_q1_q3"]
      step = f"{r['step_ratio']:.2f} [{q1:.2f}, {q3:.2f}]"
      leak, setup = f"{r['leak']:.1e}", f"{r['setup_s']:.2f}"
    else:
      step, leak, setup = f"1 ({r['step_s']:.2f} s/step)", "-", "-"
    protected = f"{r['protected']:.0%}" if r["protected"] else "-"
    lines.append(f"| {r['framework']} | {r['method']} | {protected} | {step} | {r['memory_ratio']:.2f} | {leak} "
                 f"| {setup} |")
  return "\n".join(lines)


def _child(framework: str, args: argparse.Namespace) -> list[dict[str, Any]]:
  """Runs one framework in its own process and returns its rows."""
  cmd = [sys.executable, os.path.abspath(__file__), "--framework", framework, "--steps", str(args.steps), "--json",
         "--fractions", *map(str, args.fractions)] + (["--quick"] if args.quick else [])
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  if out.returncode != 0:
    raise SystemExit(f"peers.py: the {framework} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny model and batch (a smoke test)")
  ap.add_argument("--steps", type=int, default=None, help="timed rounds = AdamW steps before the leak (default 50, "
                  "3 with --quick)")
  ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
  ap.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
  ap.add_argument("--json", action="store_true", help="print JSON lines instead of the markdown table")
  ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds allowed per framework")
  args = ap.parse_args(argv)
  args.steps = args.steps or (3 if args.quick else 50)
  setting = QUICK if args.quick else FULL
  fractions = tuple(args.fractions)

  if args.framework == "jax":
    rows = run_jax(setting, fractions, args.steps)
  elif args.framework == "torch":
    rows = run_torch(setting, fractions, args.steps)
  else:
    rows = []
    if peer_available():
      rows += _child("torch", args)
    else:
      print(f"peers.py: {INSTALL_HINT}; PyTorch rows skipped", file=sys.stderr)
    rows += _child("jax", args)
  for r in rows:
    r.update(quick=args.quick, steps=args.steps)
  if args.json or args.framework != "both":
    for r in rows:
      print(json.dumps(r), flush=True)
  else:
    print(markdown(rows), flush=True)
  return rows


if __name__ == "__main__":
  main()
