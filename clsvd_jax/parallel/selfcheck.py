"""A small end-to-end check of sharded constrained training, runnable on any set of devices.

It builds a tiny LLaMA-shaped model (the project's parameter paths and layouts: stacked ``[L, out, in]`` weights,
GQA, RMSNorm, SwiGLU), protects a subspace of every attention / MLP matrix with the layer-sharded boundary
computation, runs a few AdamW steps through ``clsvd_jax.constrained`` on a mesh, and compares with the same steps
on one device. Tests run it on CPU meshes; on a new TPU slice or GPU host run it before a long job:

    python -m clsvd_jax.parallel.selfcheck --mesh data=1,fsdp=-1,tensor=1

It prints a JSON report (``ok`` plus the details) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import clsvd_jax
from clsvd_jax._src import tree_paths
from clsvd_jax.parallel import boundary as boundary_lib
from clsvd_jax.parallel import checkpoint as checkpoint_lib
from clsvd_jax.parallel import distributed
from clsvd_jax.parallel import opt_state as opt_state_lib
from clsvd_jax.parallel import rules as rules_lib
from clsvd_jax.parallel import train_step as train_step_lib
from clsvd_jax.parallel.mesh import make_mesh

TINY = dict(vocab=64, dim=16, heads=4, kv_heads=2, head_dim=4, ffn=32, layers=4)


def tiny_llama_params(seed: int = 0, *, vocab: int, dim: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                      layers: int) -> dict[str, Any]:
  """Random parameters of a LLaMA-shaped model as a nested dict of numpy arrays (the models' paths)."""
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
  return {
      "embed_tokens": {"embedding": w(vocab, dim)},
      "layers": {
          "input_layernorm": {"scale": np.ones((layers, dim), np.float32)},
          "self_attn": {
              "q_proj": {"weight": w(layers, heads * head_dim, dim)},
              "k_proj": {"weight": w(layers, kv_heads * head_dim, dim)},
              "v_proj": {"weight": w(layers, kv_heads * head_dim, dim)},
              "o_proj": {"weight": w(layers, dim, heads * head_dim)},
          },
          "post_attention_layernorm": {"scale": np.ones((layers, dim), np.float32)},
          "mlp": {
              "gate_proj": {"weight": w(layers, ffn, dim)},
              "up_proj": {"weight": w(layers, ffn, dim)},
              "down_proj": {"weight": w(layers, dim, ffn)},
          },
      },
      "norm": {"scale": np.ones((dim,), np.float32)},
      "lm_head": {"weight": w(vocab, dim)},
  }


def _rms(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def tiny_llama_apply(params: dict[str, Any], ids: jax.Array, *, heads: int, kv_heads: int) -> jax.Array:
  """Logits ``[B, T, V]`` of the tiny model (causal attention without positions: enough to exercise sharding)."""
  hp = jax.lax.Precision.HIGHEST
  x = params["embed_tokens"]["embedding"][ids]
  b, t, _ = x.shape
  mask = jnp.tril(jnp.ones((t, t), bool))

  def block(x: jax.Array, lp: dict[str, Any]) -> tuple[jax.Array, None]:
    h = _rms(x, lp["input_layernorm"]["scale"])
    at = lp["self_attn"]
    q = jnp.einsum("btd,od->bto", h, at["q_proj"]["weight"], precision=hp).reshape(b, t, heads, -1)
    k = jnp.einsum("btd,od->bto", h, at["k_proj"]["weight"], precision=hp).reshape(b, t, kv_heads, -1)
    v = jnp.einsum("btd,od->bto", h, at["v_proj"]["weight"], precision=hp).reshape(b, t, kv_heads, -1)
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hp) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=hp).reshape(b, t, -1)
    x = x + jnp.einsum("bti,oi->bto", o, at["o_proj"]["weight"], precision=hp)
    h = _rms(x, lp["post_attention_layernorm"]["scale"])
    ml = lp["mlp"]
    g = jnp.einsum("btd,fd->btf", h, ml["gate_proj"]["weight"], precision=hp)
    u = jnp.einsum("btd,fd->btf", h, ml["up_proj"]["weight"], precision=hp)
    x = x + jnp.einsum("btf,df->btd", jax.nn.silu(g) * u, ml["down_proj"]["weight"], precision=hp)
    return x, None

  x, _ = jax.lax.scan(block, x, params["layers"])
  return jnp.einsum("btd,vd->btv", _rms(x, params["norm"]["scale"]), params["lm_head"]["weight"], precision=hp)


class Problem:
  """Tiny model, optimizer, batches and ranks shared by the reference and the sharded runs."""

  def __init__(self, seed: int = 0, batch: int = 8, seq: int = 8, steps: int = 5, lr: float = 1e-3,
               eps: float = 1e-3, **cfg: int):
    self.cfg = {**TINY, **cfg}
    self.params = tiny_llama_params(seed, **self.cfg)
    rng = np.random.default_rng(seed + 1)
    self.batches = [{"ids": rng.integers(0, self.cfg["vocab"], (batch, seq + 1)).astype(np.int32)}
                    for _ in range(steps + 1)]
    # One more batch for a run resumed from a checkpoint.
    self.resume_batch = self.batches.pop()
    # Constrained matrices learn in their complement; embeddings, norms and head train freely so the whole tree
    # (an optax.partition state with MaskedNode gaps) is exercised.
    policy = clsvd_jax.ParamPolicy.from_config(train=[r"(embed_tokens|norm|lm_head)"])
    self.constrain_mask = policy.mask(self.params)
    # Adam divides by sqrt(v) + eps, so an entry's update moves by up to lr / eps times the rounding error of its
    # gradient (with the usual eps = 1e-8, a gradient that is ~0 up to rounding moves by +-lr depending on the
    # reduction order). lr / eps = 1 keeps the comparison with one device well conditioned; |g| >> eps still
    # takes steps of ~lr.
    self.tx = policy.partition(clsvd_jax.constrained(optax.adamw(lr, eps=eps, weight_decay=0.01)),
                               train=optax.adamw(lr, eps=eps))
    layers = self.cfg["layers"]
    self.ranks = {p: (np.arange(layers, dtype=np.int32) % 4) + 1
                  for p, on in tree_paths.flatten_with_paths(self.constrain_mask).items() if on}
    # The next task's ranks: the subspaces grow from the trained weights (accumulation, docs/design.md §3).
    self.ranks_next = {p: k + 2 for p, k in self.ranks.items()}
    heads, kv = self.cfg["heads"], self.cfg["kv_heads"]

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
      ids = batch["ids"]
      logits = tiny_llama_apply(params, ids[:, :-1], heads=heads, kv_heads=kv)
      logp = jax.nn.log_softmax(logits, axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    self.step = train_step_lib.make_step(loss_fn, self.tx)


def run_reference(problem: Problem) -> dict[str, Any]:
  """The steps on one device with the core API only (no mesh, no shardings)."""
  params = jax.tree.map(jnp.asarray, problem.params)
  opt_state = problem.tx.init(params)
  subs = clsvd_jax.compute_subspaces(params, problem.ranks, previous=clsvd_jax.get_subspaces(opt_state))
  opt_state = clsvd_jax.set_subspaces(opt_state, subs)
  step = jax.jit(problem.step)
  losses = []
  for batch in problem.batches:
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(metrics["loss"]))
  subs_next = clsvd_jax.compute_subspaces(params, problem.ranks_next, previous=subs)
  out = {"losses": losses, "params": jax.device_get(params), "subspaces": jax.device_get(subs),
         "subspaces_next": jax.device_get(subs_next), "step": step}
  params, opt_state, metrics = step(params, opt_state, problem.resume_batch)
  out.update(resume_loss=float(metrics["loss"]), resume_params=jax.device_get(params))
  return out


def _gather(tree: Any) -> Any:
  """Host copies of (possibly multi-host) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def _projector(basis: np.ndarray, allow: np.ndarray) -> np.ndarray:
  span = np.einsum("...dc,...ec->...de", basis, basis)
  eye = np.eye(basis.shape[-2], dtype=span.dtype)
  return np.where(allow[..., None, None], eye - span, span)


def compare(result: dict[str, Any], reference: dict[str, Any], params0: Any, tol: float = 1e-5) -> list[str]:
  """Differences between a sharded run and the reference, plus the invariant of every constrained matrix."""
  errors = []
  for i, (a, b) in enumerate(zip(result["losses"], reference["losses"])):
    if abs(a - b) > tol * max(1.0, abs(b)):
      errors.append(f"loss at step {i + 1}: {a} vs single device {b}")
  ref_p = tree_paths.flatten_with_paths(reference["params"])
  p0 = tree_paths.flatten_with_paths(params0)
  for path, x in tree_paths.flatten_with_paths(result["params"]).items():
    diff = float(np.max(np.abs(np.asarray(x) - np.asarray(ref_p[path]))))
    if diff > tol:
      errors.append(f"param {path}: max |sharded - single device| = {diff:.2e}")
  res_p = tree_paths.flatten_with_paths(result["params"])
  is_sub = lambda x: x is None or isinstance(x, clsvd_jax.Subspace)
  for key in ("subspaces", "subspaces_next"):
    if result.get(key) is None:
      continue
    ref_s = tree_paths.flatten_with_paths(reference[key], is_leaf=is_sub)
    for path, s in tree_paths.flatten_with_paths(result[key], is_leaf=is_sub).items():
      if not isinstance(s, clsvd_jax.Subspace):
        continue
      r = ref_s[path]
      if not np.array_equal(np.asarray(s.rank), np.asarray(r.rank)):
        errors.append(f"{key} {path}: ranks {np.asarray(s.rank).tolist()} vs {np.asarray(r.rank).tolist()}")
      for side in ("left", "right"):
        pa = _projector(np.asarray(getattr(s, side)), np.asarray(getattr(s, f"{side}_allow")))
        pb = _projector(np.asarray(getattr(r, side)), np.asarray(getattr(r, f"{side}_allow")))
        if np.max(np.abs(pa - pb)) > 1e-4:
          errors.append(f"{key} {path}/{side}: projector differs from the single-device one by "
                        f"{np.max(np.abs(pa - pb)):.2e}")
  # The invariant: the constrained update never touched the protected spans (U^T dW = 0, dW V = 0).
  for path, s in tree_paths.flatten_with_paths(result["subspaces"], is_leaf=is_sub).items():
    if not isinstance(s, clsvd_jax.Subspace):
      continue
    dw = np.asarray(res_p[path]) - np.asarray(p0[path])
    pu = _projector(np.asarray(s.left), np.asarray(s.left_allow))
    pv = _projector(np.asarray(s.right), np.asarray(s.right_allow))
    leak_l = float(np.max(np.abs(pu @ dw)))
    leak_r = float(np.max(np.abs(dw @ pv)))
    if max(leak_l, leak_r) > tol:
      errors.append(f"invariant of {path}: |U U^T dW| = {leak_l:.2e}, |dW V V^T| = {leak_r:.2e}")
  return errors


def run_sharded(problem: Problem, mesh: Mesh, *, replicated_threshold: int = 256,
                next_boundary: bool = True) -> dict[str, Any]:
  """The same steps on ``mesh`` through the parallel API; also checks the layout of every array.

  With ``next_boundary`` it also grows the subspaces from the trained weights (the next task's boundary).

  Every process calls it with the same ``problem`` (multi-host: each process feeds only its rows of the batch).
  """
  params, opt_state, p_sh, o_sh = train_step_lib.shard_training_state(problem.params, problem.tx, mesh)
  subs, memory = boundary_lib.compute_subspaces_sharded(params, problem.ranks,
                                                        previous=clsvd_jax.get_subspaces(opt_state), mesh=mesh,
                                                        return_memory=True)
  opt_state = clsvd_jax.set_subspaces(opt_state, subs)
  b_sh = rules_lib.batch_shardings(mesh, problem.batches[0])
  step = train_step_lib.jit_train_step(problem.step, mesh, p_sh, o_sh, b_sh)
  layout_errors = opt_state_lib.basis_sharding_errors(opt_state, params)
  losses = []
  for batch in problem.batches:
    batch = distributed.host_local_batch(batch, b_sh)
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(metrics["loss"]))
  layout_errors += opt_state_lib.basis_sharding_errors(opt_state, params)
  want = tree_paths.flatten_with_paths(p_sh, is_leaf=lambda s: isinstance(s, NamedSharding))
  for path, x in tree_paths.flatten_with_paths(params).items():
    if x.sharding != want[path]:
      layout_errors.append(f"param {path} left the step as {x.sharding.spec}")
  subs_next = None
  if next_boundary:
    subs_next = boundary_lib.compute_subspaces_sharded(params, problem.ranks_next,
                                                       previous=clsvd_jax.get_subspaces(opt_state), mesh=mesh)
    layout_errors += opt_state_lib.basis_sharding_errors(clsvd_jax.set_subspaces(opt_state, subs_next), params)
  model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"] > 1
  replicated = []
  if model_parallel:
    # On a pure data-parallel mesh replication is the point; elsewhere nothing large may be whole on every device,
    # except what the rules replicate on purpose (norm scales) and their moments.
    specs, notes = rules_lib.param_specs(problem.params, mesh, return_report=True)
    on_purpose = {p for p, sp in tree_paths.flatten_with_paths(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
                                                               ).items() if all(e is None for e in sp)}
    on_purpose -= {n.path for n in notes}
    replicated = (opt_state_lib.replicated_arrays(params, replicated_threshold, ignore=on_purpose)
                  + opt_state_lib.replicated_arrays(opt_state, replicated_threshold, ignore=on_purpose))
  return {"losses": losses, "params": _gather(params), "subspaces": _gather(clsvd_jax.get_subspaces(opt_state)),
          "subspaces_next": None if subs_next is None else _gather(subs_next),
          "layout_errors": layout_errors, "replicated": replicated, "boundary_memory": memory,
          "state": (params, opt_state, p_sh, o_sh)}


def problem_for_mesh(sizes: dict[str, int], steps: int = 5) -> Problem:
  """The tiny problem, widened by the smallest power of two that makes every sharded dim divide its mesh axes (so
  nothing falls back to replication)."""
  d, f, t = sizes.get("data", 1), sizes.get("fsdp", 1), sizes.get("tensor", 1)
  scale = 1
  while (16 * scale) % f or (8 * scale) % t or (64 * scale) % t:
    scale *= 2
  return Problem(steps=steps, batch=max(8, 2 * d * f), layers=max(4, (d * f * t) // 2), dim=16 * scale, heads=4,
                 kv_heads=2, head_dim=4 * scale, ffn=32 * scale, vocab=64 * scale)


def _parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    out[name.strip()] = int(value)
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="axis sizes, e.g. data=2,fsdp=2,tensor=2")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--tol", type=float, default=1e-4, help="max difference from the single-device run")
  ap.add_argument("--checkpoint", help="also save the final state there (all processes write together)")
  ap.add_argument("--dump", help="process 0 writes the final params there (.npz, keys = parameter paths)")
  ap.add_argument("--report", help="process 0 also writes the JSON report to this file")
  args = ap.parse_args(argv)
  distributed.initialize_from_env()
  mesh = make_mesh(_parse_mesh(args.mesh))
  n = int(np.prod(list(mesh.shape.values())))
  problem = problem_for_mesh(dict(mesh.shape), steps=args.steps)
  result = run_sharded(problem, mesh)
  errors = result["layout_errors"] + [f"fully replicated: {r}" for r in result["replicated"]]
  if args.checkpoint:
    params, opt_state = result["state"][:2]
    checkpoint_lib.save_sharded(args.checkpoint, {"params": params, "opt_state": opt_state})
  if args.dump and distributed.is_main_process():
    np.savez(args.dump, **tree_paths.flatten_with_paths(result["params"]))
  if distributed.is_main_process():
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      reference = run_reference(problem)
    errors += compare(result, reference, problem.params, tol=args.tol)
    report = {"ok": not errors, "mesh": dict(mesh.shape), "devices": n, "processes": jax.process_count(),
              "losses": result["losses"], "boundary_memory": result["boundary_memory"], "errors": errors}
    print(json.dumps(report, indent=1))
    if args.report:
      with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
  return 0 if not errors else 1


if __name__ == "__main__":
  sys.exit(main())
