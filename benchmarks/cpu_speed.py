"""One plain training step on CPU, JAX (this library's LLaMA) against PyTorch (transformers' LLaMA), side by side.

The setting of issue 9 section 5: LLaMA with hidden 256, intermediate 688, 8 layers, 4 query / 4 key-value heads of
64, vocabulary 1024, untied head, float32; a batch of 16 x 256 random ids; causal-LM loss (mean next-token cross
entropy); plain AdamW (lr 1e-3, weight decay 0.01). Both frameworks get the same number of CPU threads.

Protocol: each framework runs in its own worker process (thread pools never meet) that compiles / warms up once and
then waits on its stdin; the parent asks the workers for one step each in turn, ``--rounds`` times, so machine
noise hits them alike. A worker times its own step (``block_until_ready`` / a synchronous torch step). Printed: the
median step time of each worker and, per JAX worker, the median and interquartile range of the per-round ratio
``jax step / torch step``. ``--xla-flags FLAGS`` adds a JAX worker run with those XLA flags (repeatable), to compare
compiler settings in the same run.

Where the gap comes from (measured with ``--profile DIR``, a per-op XLA trace; see the issue note): XLA's CPU backend
materialises transposes that BLAS-style kernels avoid. Its dot kernels want the contracting dimension innermost, so
each weight gradient ``dW = dy^T x`` (contracting over the 4096 tokens) first copies ``dy`` into ``[features,
tokens]`` order, and XLA fuses that strided copy into the elementwise backward that produces ``dy`` (SiLU, RMS norm,
rotary), which then writes column by column; attention's logits gradient ``[B, H, T, S]`` is transposed the same
way. PyTorch calls MKL / oneDNN GEMMs with transposed operands in place and a fused SDPA attention kernel. On GPU
and TPU this does not carry over: cuBLAS / the MXU take transposed operands natively and layout assignment makes
these transposes free, and attention there uses fused kernels (cuDNN / Pallas flash attention).

Usage::

  python benchmarks/cpu_speed.py                       # 15 rounds, 2 threads each
  python benchmarks/cpu_speed.py --quick               # tiny model, 2 rounds: a smoke test (seconds)
  python benchmarks/cpu_speed.py --xla-flags=--xla_cpu_use_onednn=true   # and a JAX worker with XLA flags
  python benchmarks/cpu_speed.py --profile /tmp/trace  # a jax.profiler trace of 2 JAX steps, then per-op totals
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

FULL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, head_dim=64, batch=16, length=256)
QUICK = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, head_dim=16, batch=2, length=16)
LR, WEIGHT_DECAY = 1e-3, 0.01


def _model_config(setting: dict[str, int]) -> dict[str, Any]:
  return {k: v for k, v in setting.items() if k not in ("batch", "length")} | {"tie_word_embeddings": False}


def _ids(setting: dict[str, int]) -> np.ndarray:
  rng = np.random.RandomState(0)
  return rng.randint(0, setting["vocab_size"], (setting["batch"], setting["length"])).astype(np.int32)


# ---------------------------------------------------------------------------------------------------- workers


def _jax_step(setting: dict[str, int]):
  """A jitted plain AdamW step of this library's LLaMA: ``step() -> seconds``."""
  import jax
  import jax.numpy as jnp
  import optax

  from clsvd_jax import models

  model = models.init_from_config({"model_type": "llama", **_model_config(setting)}, seed=0)
  apply_fn, params = models.functional(model)
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  ids = jnp.asarray(_ids(setting))

  def loss_fn(p, ids):
    logp = jax.nn.log_softmax(apply_fn(p, ids)[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

  @jax.jit
  def update(p, s, ids):  # ids an argument: as a closure constant XLA would spend seconds folding the loss
    loss, grads = jax.value_and_grad(loss_fn)(p, ids)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  state = [params, tx.init(params)]

  def step() -> float:
    t = time.perf_counter()
    p, s, loss = update(*state, ids)
    loss.block_until_ready()
    state[:] = [p, s]
    return time.perf_counter() - t

  return step


def _torch_step(setting: dict[str, int], threads: int):
  """A plain AdamW step of transformers' ``LlamaForCausalLM`` (SDPA attention): ``step() -> seconds``."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = LlamaForCausalLM(LlamaConfig(**_model_config(setting))).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  ids = torch.tensor(_ids(setting), dtype=torch.long)

  def step() -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    (-logp.gather(-1, ids[:, 1:, None]).mean()).backward()
    opt.step()
    return time.perf_counter() - t

  return step


def _worker(kind: str, setting: dict[str, int], threads: int) -> None:
  """Warms up, says ``ready``, then answers every ``step`` line on stdin with the step's seconds."""
  step = _jax_step(setting) if kind == "jax" else _torch_step(setting, threads)
  step()  # compile / allocate
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    print(f"{step():.6f}", flush=True)


def _start(name: str, kind: str, args: argparse.Namespace, xla_flags: str = "") -> dict[str, Any]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # XLA's CPU client sizes its thread pool from the CPUs it may use; pin both frameworks to the same ones.
  env["XLA_FLAGS"] = xla_flags
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--threads", str(args.threads)]
  if args.quick:
    cmd.append("--quick")
  if args.threads < (os.cpu_count() or 1):
    cmd = ["taskset", "-c", f"0-{args.threads - 1}", *cmd]
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  line = proc.stdout.readline().strip()
  if line != "ready":
    proc.kill()
    raise RuntimeError(f"worker {name} failed to start (got {line!r}); run it alone: {' '.join(cmd)}")
  return {"name": name, "kind": kind, "proc": proc, "times": []}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
  q = np.percentile(xs, [25, 50, 75])
  return float(q[0]), float(q[1]), float(q[2])


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Starts the workers, interleaves ``args.rounds`` rounds of one step each, returns the summary."""
  workers: list[dict[str, Any]] = []
  try:
    for name, kind, flags in [("torch", "torch", ""), ("jax", "jax", "")] + [
        (f"jax {f}", "jax", f) for f in args.xla_flags]:
      workers.append(_start(name, kind, args, flags))
    for _ in range(args.rounds):
      for w in workers:
        w["proc"].stdin.write("step\n")
        w["proc"].stdin.flush()
        w["times"].append(float(w["proc"].stdout.readline()))
  finally:
    for w in workers:  # a worker exits at the end of its stdin
      w["proc"].stdin.close()
      w["proc"].wait(timeout=60)
  torch_times = workers[0]["times"]
  out = {"setting": FULL if not args.quick else QUICK, "threads": args.threads, "rounds": args.rounds,
         "median_step_s": {w["name"]: statistics.median(w["times"]) for w in workers}, "ratio_over_torch": {}}
  for w in workers[1:]:
    q1, med, q3 = _quartiles([a / b for a, b in zip(w["times"], torch_times)])
    out["ratio_over_torch"][w["name"]] = {"median": med, "iqr": [q1, q3]}
  return out


def profile(args: argparse.Namespace) -> None:
  """A ``jax.profiler`` trace of two steps in ``args.profile``, and the 25 largest per-op totals."""
  import glob
  import gzip

  import jax

  setting = QUICK if args.quick else FULL
  step = _jax_step(setting)
  step()
  jax.profiler.start_trace(args.profile)
  for _ in range(2):
    step()
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(os.path.join(args.profile, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  totals: dict[str, float] = {}
  for e in json.load(gzip.open(trace))["traceEvents"]:
    if e.get("ph") == "X" and not e["name"].startswith(("ThunkExecutor", "$", "SlinkyThreadPool")):
      totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0) / 1e3
  print(f"trace: {trace}\nper-op totals over 2 steps (ms):")
  for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{ms:10.1f}  {name}")


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--threads", type=int, default=2, help="CPU threads of each framework (pinned with taskset)")
  p.add_argument("--quick", action="store_true", help="a tiny model and 2 rounds (smoke test)")
  p.add_argument("--xla-flags", action="append", default=[], help="add a JAX worker with these XLA flags")
  p.add_argument("--profile", help="write a jax.profiler trace of 2 JAX steps here and print per-op totals")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
  p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    _worker(args.worker, QUICK if args.quick else FULL, args.threads)
    return
  if args.profile:
    profile(args)
    return
  if args.quick:
    args.rounds = min(args.rounds, 2)
  out = run(args)
  if args.json:
    print(json.dumps(out))
    return
  print(f"{args.rounds} interleaved rounds, {args.threads} threads each; one plain AdamW step")
  print(f"{'worker':40s} {'median s':>9s} {'ratio / torch [IQR]':>24s}")
  for name, sec in out["median_step_s"].items():
    r = out["ratio_over_torch"].get(name)
    ratio = f"{r['median']:.2f} [{r['iqr'][0]:.2f}, {r['iqr'][1]:.2f}]" if r else ""
    print(f"{name:40s} {sec:9.3f} {ratio:>24s}")


if __name__ == "__main__":
  main()
