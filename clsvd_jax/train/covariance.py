"""Input covariances of the constrained matrices on calibration batches (``activations`` source, docs/design.md §4b).

For a matrix W ``[out, in]`` applied as ``y = x W^T`` the statistic is ``C = sum_t x_t x_t^T`` ``[in, in]`` over
the real (non-pad) tokens of the calibration batches; ``compute_subspaces(..., covariances=...)`` takes its
top eigenvectors in the complement as the new right basis. The models compute it in one forward pass that records
the input of every matrix (``clsvd_jax.models.matrix_input_covariances``, tested against PyTorch forward hooks);
this module adapts the runner's batches to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from clsvd_jax import models
from clsvd_jax.train import model_io

# The batch fields each family's forward pass reads (the runner's batches also carry labels and loss masks).
_CALL_KEYS = {
  "t5": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
  "llama": ("input_ids", "attention_mask"),
}


def matrix_input_covariances(model: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
  """``{path: [L, n, n]}`` sums of ``x x^T`` over the real tokens of ``batches`` for every attention / MLP matrix.

  Raises:
    NotImplementedError: for a family whose model does not record matrix inputs (use ``osft.basis_source:
      weights`` there).
  """
  family = model_io.family_of(model)
  if family not in _CALL_KEYS:
    raise NotImplementedError(f"basis_source 'activations' needs matrix inputs, which the {family!r} family does not "
                              "expose; use osft.basis_source: weights")
  keys = _CALL_KEYS[family]
  return dict(models.matrix_input_covariances(model, [{k: b[k] for k in keys if k in b} for b in batches]))
