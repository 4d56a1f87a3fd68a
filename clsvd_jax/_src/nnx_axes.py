"""Input / output axes of a Flax NNX model's kernels, read off its layers (``nnx.Linear``, ``LinearGeneral``,
``Einsum``, ``Embed``), for the ``axes`` argument of ``constrained`` and ``compute_subspaces``."""

from __future__ import annotations

from typing import Any

from flax import nnx

from clsvd_jax._src.matrix_axes import MatrixAxes


def einsum_axes(einsum_str: str, kernel_ndim: int | None = None) -> MatrixAxes:
  """The ``MatrixAxes`` of the kernel (right operand) of an ``nnx.Einsum`` equation such as ``'bte,ehd->bthd'``.

  A kernel letter shared with the input and absent from the output is an input axis, one found in the output only
  an output axis, one in both a batch axis (one matrix per index). Leading kernel axes beyond the equation's
  (``nnx.vmap`` / ``nnx.scan`` stacking) are batch axes too.

  Raises:
    ValueError: for an equation whose kernel has an axis that is neither contracted nor kept, or no input or no
      output axis.
  """
  eq = einsum_str.replace(" ", "")
  try:
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
  except ValueError:
    raise ValueError(f"einsum {einsum_str!r}: expected 'input,kernel->output'") from None
  offset = 0 if kernel_ndim is None else kernel_ndim - len(rhs)
  if "." in rhs or offset < 0:
    raise ValueError(f"einsum {einsum_str!r}: the kernel {rhs!r} must name each of its axes with one letter")
  inputs, outputs = [], []
  for i, c in enumerate(rhs):
    if c in lhs and c not in out:
      inputs.append(i + offset)
    elif c in out and c not in lhs:
      outputs.append(i + offset)
    elif c not in lhs:
      raise ValueError(f"einsum {einsum_str!r}: kernel axis {c!r} is summed away; it is not a linear map's axis")
  if not inputs or not outputs:
    raise ValueError(f"einsum {einsum_str!r}: the kernel needs at least one input and one output axis")
  return MatrixAxes(input=tuple(inputs), output=tuple(outputs))


def _module_axes(module: Any, ndim: int) -> MatrixAxes | None:
  if isinstance(module, nnx.Einsum):
    return einsum_axes(module.einsum_str, ndim)
  if isinstance(module, nnx.LinearGeneral):
    n_out = len(module.out_features)
    n_in = len(module.in_features)
    return MatrixAxes(input=tuple(range(ndim - n_out - n_in, ndim - n_out)), output=tuple(range(ndim - n_out, ndim)))
  if isinstance(module, nnx.Linear | nnx.Embed):
    # An embedding table maps a one-hot input (the vocabulary) to features: [in, out] like a kernel.
    return MatrixAxes(input=-2, output=-1)
  return None


def nnx_matrix_axes(model: nnx.Module) -> dict[str, MatrixAxes]:
  """``{path: MatrixAxes}`` for every ``nnx.Linear``, ``LinearGeneral``, ``Einsum`` and ``Embed`` in ``model``.

  Paths are those of ``nnx.state(model, nnx.Param)`` (``"blocks/0/attn/kernel"``). Pass the dict as ``axes=`` to
  both ``clsvd_jax.constrained(...)`` and ``clsvd_jax.compute_subspaces(...)``; other parameters take the default.
  """
  out = {}
  for path, module in nnx.iter_modules(model):
    name = "embedding" if isinstance(module, nnx.Embed) else "kernel"
    param = getattr(module, name, None)
    if not isinstance(param, nnx.Param):
      continue
    axes = _module_axes(module, param.ndim)
    if axes is not None:
      out["/".join(str(p) for p in (*path, name))] = axes
  return out
