"""Tolerances of the float32 parity tests, relative to the scale of the compared tensor.

A float32 result differs from the exact one by reassociation: XLA and PyTorch sum the same products in different
orders (blocking, vectorisation, fused kernels). The error of an entry scales with the magnitudes of the terms summed
into it, which is the scale of the whole tensor, not with the entry itself: an entry near zero can be a sum of large
terms that cancel. So the tolerances here are a number of float32 ulps of the tensor's largest entry, never an
absolute number (too loose for small tensors, flaky for large ones) nor a per-entry relative one (flaky near zero).
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

# Logits against float32 PyTorch: measured up to 55 ulps of the logits' scale (both implementations' rounding)
# on the tiny T5 and LLaMA test models over 3 seeds x 2 batches.
LOGITS_ULPS = 256
# Gradients against float64 PyTorch: measured up to 176 ulps of the gradient's scale (ours; PyTorch's own float32
# backward reaches 620) on the tiny T5 test model with enlarged weights over 4 seeds x 2 batches.
GRAD_ULPS = 1024


def assert_close_at_scale(actual, desired, *, ulps: float, where=None, err_msg: str = "") -> None:
  """``|actual - desired| <= ulps * EPS32 * max|desired|`` entry by entry (over ``where`` if given)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
  if where is not None:
    actual, desired = actual[where], desired[where]
  scale = np.abs(desired).max()
  err = np.abs(actual - desired).max()
  assert np.isfinite(actual).all() and err <= ulps * EPS32 * scale, (
    f"{err_msg}: max error {err:.3g} = {err / (EPS32 * scale):.0f} ulps of the scale {scale:.3g} > {ulps} ulps")
