"""Session-wide settings of the test suite, applied before any test module imports JAX.

Eight host (CPU) devices: the mesh tests (tests/parallel, tests/train/test_train_mesh.py, the sharded loading tests
of tests/models) run in-process on meshes of 4 or 8 devices instead of one subprocess each, which paid the JAX
import and every compile again. Single-device code is unaffected: an array lives on ``jax.devices()[0]`` unless it
is placed elsewhere, and the devices share XLA's one CPU thread pool. Subprocesses remain only where a test needs
several processes (``jax.distributed``) or a process of its own (a deadlock reproducer, the CLI).

``JAX_PLATFORMS`` defaults to ``cpu`` (set it to run the suite elsewhere): the tolerances were measured there and the
mesh tests need the host devices.

Markers (registered in pyproject.toml): ``slow`` (a test of more than ~20 s on an idle 2-core machine, or one that
launches subprocesses) and ``multiprocess`` (starts several Python processes). ``make test-fast`` runs
``-m "not slow and not multiprocess"`` over tests/core, tests/models and tests/data.
"""

import os
import sys

HOST_DEVICES = 8

if "jax" in sys.modules:  # the flag below only acts before JAX starts its CPU client
  raise RuntimeError("tests/conftest.py: JAX was imported before the suite could set its 8 host devices; run the "
                     "tests with `python -m pytest` from the repository root (no plugin may import JAX first)")
_flag = "--xla_force_host_platform_device_count"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={HOST_DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
