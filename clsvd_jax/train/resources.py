"""Peak memory of the running process, as far as it can be measured here.

Both readings are high-water marks of the whole process (they never go down), so they describe one run only when
the run had the process to itself (``clsvd train``, or each run of ``clsvd compare``, which starts one process per
run). ``device_bytes`` is the largest ``peak_bytes_in_use`` over this process's accelerators (None on a CPU, whose
allocator reports nothing); ``host_rss_bytes`` the largest resident set of the process (None where ``resource`` is
missing, e.g. Windows).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import jax


def peak_memory() -> dict[str, int | None]:
  """``{"device_bytes", "host_rss_bytes"}`` high-water marks of this process (see the module docstring)."""
  device = None
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without an allocator report raise or return None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      device = max(device or 0, int(stats["peak_bytes_in_use"]))
  return {"device_bytes": device, "host_rss_bytes": _host_rss()}


def _host_rss() -> int | None:
  try:
    import resource
  except ImportError:
    return None
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports kilobytes, macOS bytes.
  return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def merge_peaks(old: Mapping[str, int | None], new: Mapping[str, int | None]) -> dict[str, int | None]:
  """The larger reading per key (a resumed run keeps the peak of the processes before it)."""
  out = {}
  for key in set(old) | set(new):
    values = [v for v in (old.get(key), new.get(key)) if v is not None]
    out[key] = max(values) if values else None
  return out
