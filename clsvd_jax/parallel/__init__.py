"""Scale: device meshes, partition rules, sharded train steps and boundaries, several hosts (docs/design.md §10).

Typical use::

    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    params, opt_state, p_sh, o_sh = parallel.shard_training_state(params, tx, mesh)
    step = parallel.jit_train_step(parallel.make_step(loss_fn, tx), mesh, p_sh, o_sh,
                                   parallel.batch_shardings(mesh, example_batch))
    subs = parallel.compute_subspaces_sharded(params, ranks, clsvd_jax.get_subspaces(opt_state), mesh=mesh)
    opt_state = clsvd_jax.set_subspaces(opt_state, subs)
"""

from clsvd_jax.parallel.boundary import compute_subspaces_sharded, memory_stats
from clsvd_jax.parallel.checkpoint import abstract_state, restore_sharded, save_sharded
from clsvd_jax.parallel.distributed import (
    distributed_config,
    host_local_batch,
    host_rows,
    host_slice,
    initialize_from_env,
    is_main_process,
    make_global_array,
)
from clsvd_jax.parallel.memory import (
    accelerator_devices,
    format_memory_report,
    load_model_config,
    memory_report,
    model_shapes,
)
from clsvd_jax.parallel.mesh import AXES, make_mesh, mesh_shape, resolve_mesh_shape
from clsvd_jax.parallel.opt_state import (
    basis_sharding_errors,
    init_opt_state,
    opt_state_shardings,
    opt_state_specs,
    replicated_arrays,
    subspace_specs,
)
from clsvd_jax.parallel.rules import (
    DEFAULT_RULES,
    LLAMA_RULES,
    T5_RULES,
    Fallback,
    activation_sharding,
    batch_shardings,
    batch_spec,
    param_shardings,
    param_specs,
    shard_params,
    spec_for,
)
from clsvd_jax.parallel.train_step import jit_train_step, make_step, shard_training_state

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "Fallback",
    "LLAMA_RULES",
    "T5_RULES",
    "abstract_state",
    "accelerator_devices",
    "activation_sharding",
    "basis_sharding_errors",
    "batch_shardings",
    "batch_spec",
    "compute_subspaces_sharded",
    "distributed_config",
    "format_memory_report",
    "host_local_batch",
    "host_rows",
    "host_slice",
    "init_opt_state",
    "initialize_from_env",
    "is_main_process",
    "jit_train_step",
    "load_model_config",
    "make_global_array",
    "make_mesh",
    "make_step",
    "memory_report",
    "memory_stats",
    "mesh_shape",
    "model_shapes",
    "opt_state_shardings",
    "opt_state_specs",
    "param_shardings",
    "param_specs",
    "replicated_arrays",
    "resolve_mesh_shape",
    "restore_sharded",
    "save_sharded",
    "shard_params",
    "shard_training_state",
    "spec_for",
    "subspace_specs",
]
