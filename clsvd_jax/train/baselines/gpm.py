"""``method: gpm``: gradient projection memory as a preset of the constrained method.

``configure`` replaces the ``osft`` section by ``methods.gpm.gpm_config``: one-sided right projection
``G (I - V V^T)``, bases from the finished tasks' input activations, the energy rank policy with ``gpm.eps``, and
protection from the second task on. The parameter policy, calibration batches and ``min_trainable`` of the
``osft`` section are kept. Everything else is the constrained method's (the task scheduler, the invariant check of
the right side). Known limit: a matrix's protected rank is capped at ``min(m, n) - osft.min_trainable`` on both
sides, so a wide matrix (more inputs than outputs) cannot store its whole input span.
"""

from __future__ import annotations

import dataclasses

from clsvd_jax.config import RunConfig
from clsvd_jax.methods.gpm import gpm_config


def configure(config: RunConfig) -> RunConfig:
  """``config`` with the ``osft`` section set to GPM's preset (``gpm.eps``, ``gpm.max_rank_ratio``)."""
  osft = gpm_config(config.gpm.eps, base=config.osft, max_rank_ratio=config.gpm.max_rank_ratio)
  return dataclasses.replace(config, osft=osft)
