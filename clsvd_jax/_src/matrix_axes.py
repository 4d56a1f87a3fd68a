"""Which axes of a parameter are the input and the output of its linear map.

The subspace code works on one orientation, the matrix ``[..., m, n]`` that maps an input of size n to an output of
size m (PyTorch / Hugging Face ``weight`` layout): the left basis spans outputs, the right basis inputs. Parameters
stored otherwise are viewed through a ``MatrixAxes``: Flax kernels are ``[in, out]``, ``nnx.Einsum`` kernels can be
``[embed, heads, head_dim]`` (one input axis, two output axes), ``nnx.scan``-stacked layers carry a layer axis.
Every axis that is neither input nor output is a batch axis: one independent matrix per index (a stack of layers).

Default per leaf (``axes=None``): a leaf named ``kernel`` (Flax's name) with two axes is ``[in, out]``; a
``kernel`` with more axes is refused, since Flax layers order such axes differently (say which ones it has, or
read them off the model with ``clsvd_jax.nnx_matrix_axes``); every other leaf is ``[..., out, in]``, leading axes
stacking matrices (the library's models and Hugging Face checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp


class MatrixAxes(NamedTuple):
  """The input and output axes of a parameter's linear map (negative indices count from the end).

  Attributes:
    input: axis or axes contracted with the layer's input (their sizes multiply to n).
    output: axis or axes that form the layer's output (their sizes multiply to m).
  """

  input: int | tuple[int, ...]
  output: int | tuple[int, ...]


OUT_IN = MatrixAxes(input=-1, output=-2)
"""``[..., out, in]``: PyTorch / Hugging Face ``weight`` (the library's models)."""

IN_OUT = MatrixAxes(input=-2, output=-1)
"""``[..., in, out]``: Flax ``kernel`` of ``nnx.Linear`` / ``nnx.Einsum('...i,io->...o')``."""

AxesSpec = MatrixAxes | Mapping[str, MatrixAxes] | Callable[[str, tuple[int, ...]], Any] | None


class Layout(NamedTuple):
  """A resolved ``MatrixAxes`` for one shape: non-negative axes and the matrix view's shapes."""

  batch: tuple[int, ...]
  output: tuple[int, ...]
  input: tuple[int, ...]
  shape: tuple[int, ...]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(m, n): output size, input size."""
    return (math.prod(self.shape[a] for a in self.output), math.prod(self.shape[a] for a in self.input))

  @property
  def view_shape(self) -> tuple[int, ...]:
    """``batch_shape + (m, n)``, the shape the subspace code sees."""
    return self.batch_shape + self.matrix_shape

  @property
  def is_native(self) -> bool:
    """The parameter already is ``[..., out, in]`` with one output and one input axis: no reshaping needed."""
    nd = len(self.shape)
    return self.output == (nd - 2,) and self.input == (nd - 1,)


def _axes_tuple(path: str, what: str, axes: Any, ndim: int) -> tuple[int, ...]:
  items = (axes,) if isinstance(axes, int) else tuple(axes)
  if not items or not all(isinstance(a, int) for a in items) or any(not -ndim <= a < ndim for a in items):
    raise ValueError(f"parameter {path!r} has {ndim} axes; its MatrixAxes {what}={axes!r} must name one or more of "
                     f"them (ints in [-{ndim}, {ndim - 1}])")
  return tuple(a % ndim for a in items)


def layout(path: str, shape: tuple[int, ...], axes: MatrixAxes) -> Layout:
  """Resolves ``axes`` for a parameter of ``shape``, with errors that name ``path``."""
  shape = tuple(int(d) for d in shape)
  nd = len(shape)
  if nd < 2:
    raise ValueError(f"parameter {path!r} has shape {shape}: only matrices ([..., m, n]) can be constrained")
  if not isinstance(axes, MatrixAxes):
    raise ValueError(f"axes for {path!r} must be a clsvd_jax.MatrixAxes(input=..., output=...); got {axes!r}")
  inp = _axes_tuple(path, "input", axes.input, nd)
  out = _axes_tuple(path, "output", axes.output, nd)
  if len(set(inp + out)) != len(inp) + len(out):
    raise ValueError(f"parameter {path!r}: MatrixAxes input={axes.input!r} and output={axes.output!r} must be "
                     "distinct axes")
  batch = tuple(a for a in range(nd) if a not in inp + out)
  return Layout(batch, out, inp, shape)


def default_axes(path: str, shape: tuple[int, ...]) -> MatrixAxes:
  """The per-leaf default described in the module docstring."""
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":
    if len(shape) == 2:
      return IN_OUT
    raise ValueError(
        f"parameter {path!r} is a kernel with {len(shape)} axes {tuple(shape)}: say which axes are its input and "
        f"output, e.g. axes={{{path!r}: clsvd_jax.MatrixAxes(input=0, output=(1, 2))}} for an nnx.Einsum "
        "'...e,ehd->...hd' kernel [e, h, d] (other axes stack matrices), or axes=clsvd_jax.nnx_matrix_axes(model), "
        "to both clsvd_jax.constrained(...) and compute_subspaces(...); or leave it out of the constrain mask")
  return OUT_IN


def resolve(path: str, shape: tuple[int, ...], axes: AxesSpec = None) -> Layout:
  """The ``Layout`` of one parameter under the user's ``axes`` spec.

  Args:
    path: the parameter's path (``clsvd_jax.flatten_with_paths``' form).
    shape: its shape.
    axes: None (the default per leaf), one ``MatrixAxes`` for every parameter, a dict ``{path: MatrixAxes}``
      (paths it does not name take the default), or a callable ``(path, shape) -> MatrixAxes or None`` (None: the
      default).
  """
  spec = None
  if isinstance(axes, MatrixAxes):
    spec = axes
  elif isinstance(axes, Mapping):
    spec = axes.get(path)
  elif callable(axes):
    spec = axes(path, tuple(shape))
  elif axes is not None:
    raise ValueError(f"axes must be None, a clsvd_jax.MatrixAxes, a dict {{path: MatrixAxes}} or a callable "
                     f"(path, shape) -> MatrixAxes; got {type(axes).__name__}")
  if len(tuple(shape)) < 2:
    raise ValueError(f"parameter {path!r} has shape {tuple(shape)}: only matrices ([..., m, n]) can be "
                     "constrained; remove it from the constrain mask / policy")
  return layout(path, shape, spec if spec is not None else default_axes(path, shape))


def check_axes_paths(axes: AxesSpec, paths: Any) -> None:
  """Raises when a dict ``axes`` names parameters that do not exist (a typo would silently fall to the default)."""
  if isinstance(axes, Mapping) and not isinstance(axes, MatrixAxes):
    unknown = sorted(set(axes) - set(paths))
    if unknown:
      raise ValueError(f"axes name parameters that do not exist: {unknown[:5]}; known parameters include "
                       f"{list(paths)[:8]}")


def to_matrix(x: jnp.ndarray, lay: Layout) -> jnp.ndarray:
  """``x`` (shaped like the parameter) as ``[*batch, m, n]``."""
  if lay.is_native:
    return x
  return jnp.transpose(x, lay.batch + lay.output + lay.input).reshape(lay.view_shape)


def from_matrix(y: jnp.ndarray, lay: Layout) -> jnp.ndarray:
  """Inverse of ``to_matrix``."""
  if lay.is_native:
    return y
  perm = lay.batch + lay.output + lay.input
  y = y.reshape(tuple(lay.shape[a] for a in perm))
  return jnp.transpose(y, tuple(perm.index(a) for a in range(len(perm))))
