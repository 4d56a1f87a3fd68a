"""Sharded constrained training on 8 CPU devices: meshes (8,1,1), (2,2,2), (1,4,2) against one device, bases laid
out as their weights, nothing large replicated, boundary memory, and a checkpoint saved on 8 devices resumed on 4
and on 1. Every check runs in ONE subprocess (tests/parallel/_mesh_worker.py) that sees 8 devices, so the rest of
the suite keeps its single device and the slow CPU compiles happen once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_mesh_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("meshes")
  out = tmp / "report.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, str(WORKER), str(out), str(tmp / "ckpt")], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, f"mesh worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return json.loads(out.read_text())


def test_sharded_training_on_three_meshes(report):
  meshes = report["meshes"]
  assert set(meshes) == {"(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"}
  for name, r in meshes.items():
    # Same loss and params as one device to 1e-5 after 5 steps, subspaces (and the next boundary's grown ones)
    # equal to the single-device ones, and U U^T dW = dW V V^T = 0 for every constrained matrix.
    assert r["compare_errors"] == [], (name, r["compare_errors"])
    assert len(r["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(r["losses"], r["reference_losses"])) < 1e-5
    # Every basis laid out as its weight says, before and after the steps.
    assert r["layout_errors"] == [], (name, r["layout_errors"])
    # q_proj [L, out, in] is column-parallel: out on tensor, in on fsdp; its left basis [L, out, c] takes the
    # out spec (capacity column on the in spec), the right basis [L, in, c] the in spec; ranks replicated.
    assert r["probe"] == {"weight": [None, "tensor", "fsdp"], "left": [None, "tensor", "fsdp"],
                          "right": [None, "fsdp", "tensor"], "rank": []}, name
  # Where the mesh has model-parallel axes, no array of >= 256 elements is whole on every device.
  for name in ("(2, 2, 2)", "(1, 4, 2)"):
    assert meshes[name]["replicated"] == [], (name, meshes[name]["replicated"])


def test_boundary_memory_is_reported_and_shrinks_with_sharding(report):
  mem = {name: r["boundary_memory"] for name, r in report["meshes"].items()}
  for name, m in mem.items():
    assert m is not None and m["peak"] > 0 and m["argument"] > 0, (name, m)
  # Pure data parallelism replicates the weights; FSDP x tensor splits them, so the boundary needs less per device.
  assert mem["(1, 4, 2)"]["peak"] < mem["(2, 2, 2)"]["peak"] < mem["(8, 1, 1)"]["peak"]


def test_checkpoint_saved_on_8_devices_resumes_on_4_and_1(report):
  ck = report["checkpoint"]
  assert ck["4"]["devices"] == 4 and ck["1"]["devices"] == 1
  for name, r in ck.items():
    # Same values as saved, laid out as the new target asks, and the next step equals the uninterrupted run.
    assert r["errors"] == [], (name, r["errors"])
    assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * abs(r["reference_loss"])
