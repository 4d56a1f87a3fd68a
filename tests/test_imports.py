"""One-way imports: the core, the models and the config load without the packages above them.

The layers, bottom up: ``clsvd_jax`` (the optimizer core, ``_src``), ``models`` and ``data``, ``config``, then
``parallel`` and ``train``. Each check imports one module in a fresh interpreter, runs the code paths that used to
import upwards on first use (config validation, placing a loaded tensor on a mesh), and reads ``sys.modules``, so
neither an earlier import nor a deferred one can hide an upward import. One subprocess runs every check.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# module imported -> packages it must not load
RULES = {
  "clsvd_jax": ("clsvd_jax.models", "clsvd_jax.parallel", "clsvd_jax.train", "clsvd_jax.config", "clsvd_jax.data"),
  "clsvd_jax.models": ("clsvd_jax.parallel", "clsvd_jax.train", "clsvd_jax.config"),
  "clsvd_jax.config": ("clsvd_jax.train", "clsvd_jax.parallel", "clsvd_jax.models"),
  "clsvd_jax.methods.registry": ("clsvd_jax.train", "clsvd_jax.parallel", "clsvd_jax.models", "clsvd_jax.config"),
  "clsvd_jax._src.partition_rules": ("clsvd_jax.parallel", "clsvd_jax.models", "clsvd_jax.train"),
  "clsvd_jax.parallel": ("clsvd_jax.train",),
}

# What each check runs after the import (``m`` is the module): the paths that reach other packages lazily.
EXERCISE = {
  "clsvd_jax.models": "import jax, numpy as np\n"
                      "from clsvd_jax.models import common\n"
                      "devices = np.array(jax.devices()[:1]).reshape(1, 1, 1)\n"
                      "mesh = jax.sharding.Mesh(devices, ('data', 'fsdp', 'tensor'))\n"
                      "common.sharding_for('layers/mlp/up_proj/weight', (2, 8, 4), mesh, None)\n",
  "clsvd_jax.config": "m.from_dict({'model': {'config': {'d_model': 8}, 'tokenizer': 'byt5'}, "
                      "'tasks': [{'name': 'low', 'source': 'synthetic'}], 'method': 'osft'})\n",
}

# Runs in the child: for each module, a fresh interpreter would cost ~2 s of JAX import each; instead the child
# forks one grandchild per module (os.fork before anything is imported), and each reports its sys.modules.
_CHILD = textwrap.dedent("""
  import json, os, sys
  rules, exercise = json.loads(sys.argv[1]), json.loads(sys.argv[2])
  out = {}
  for module in rules:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(r)
      import importlib
      m = importlib.import_module(module)
      exec(exercise.get(module, ""), {"m": m})
      loaded = sorted(n for n in sys.modules if any(n == p or n.startswith(p + ".") for p in rules[module]))
      os.write(w, json.dumps(loaded).encode())
      os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
      data = f.read()
    _, status = os.waitpid(pid, 0)
    out[module] = json.loads(data) if status == 0 and data else f"failed (wait status {status}), see stderr"
  print(json.dumps(out))
""")


@pytest.mark.multiprocess
def test_imports_are_one_way():
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(RULES), json.dumps(EXERCISE)],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(loaded) == set(RULES)
  offenders = {module: found for module, found in loaded.items() if found}
  assert not offenders, f"upward imports (module -> forbidden modules it loaded): {offenders}\n{proc.stderr[-2000:]}"
