"""clsvd_jax: continual full fine-tuning of LLMs with orthogonal-complement updates (adaptive SVD / OSFT).

The core is an optax transformation: ``constrained(inner)`` keeps every update of a constrained matrix W in the
orthogonal complement of its protected subspaces, so ``U^T dW = 0`` and ``dW V = 0`` hold exactly. It runs in
plain optax loops and inside ``nnx.Optimizer``; ``MatrixAxes`` says which axes of a parameter are its input and
output (Flax ``[in, out]`` kernels, ``nnx.Einsum`` kernels with more axes). ``scale_by_orthogonal_complement`` is
an alias of ``constrained`` (the same function, in optax's ``scale_by_*`` naming); the docs use ``constrained``.
"""

from clsvd_jax._src import rank_policy
from clsvd_jax._src.matrix_axes import IN_OUT, OUT_IN, MatrixAxes
from clsvd_jax._src.nnx_axes import einsum_axes, nnx_matrix_axes
from clsvd_jax._src.param_policy import DEFAULT_CONSTRAIN, ParamPolicy
from clsvd_jax._src.projection import (
    ConstrainedState,
    OrthogonalProjectionState,
    check_subspaces,
    constrained,
    get_subspaces,
    init_subspaces,
    matrix_shapes,
    orthogonal_projection,
    project_updates,
    scale_by_orthogonal_complement,
    set_subspaces,
)
from clsvd_jax._src.rank_policy import energy_ranks, importance_ranks, normalize_importance, schedule_ranks
from clsvd_jax._src.subspace import (
    Subspace,
    complement_left,
    complement_right,
    compute_subspaces,
    default_capacity,
    default_precision,
    empty_subspace,
    project,
    protected_basis,
    protected_left,
    protected_right,
)
from clsvd_jax._src.tree_paths import flatten_with_paths, map_with_paths, path_str

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CONSTRAIN",
    "IN_OUT",
    "OUT_IN",
    "ConstrainedState",
    "OrthogonalProjectionState",
    "ParamPolicy",
    "Subspace",
    "check_subspaces",
    "complement_left",
    "complement_right",
    "compute_subspaces",
    "constrained",
    "default_capacity",
    "default_precision",
    "empty_subspace",
    "einsum_axes",
    "energy_ranks",
    "flatten_with_paths",
    "get_subspaces",
    "MatrixAxes",
    "importance_ranks",
    "init_subspaces",
    "map_with_paths",
    "matrix_shapes",
    "normalize_importance",
    "nnx_matrix_axes",
    "orthogonal_projection",
    "path_str",
    "project",
    "project_updates",
    "protected_basis",
    "protected_left",
    "protected_right",
    "rank_policy",
    "scale_by_orthogonal_complement",
    "schedule_ranks",
    "set_subspaces",
]
