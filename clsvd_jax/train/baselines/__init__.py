"""The baselines' runner hooks (``clsvd_jax.train.hooks.MethodHooks``), one module per method.

Each module wires the building blocks of ``clsvd_jax.methods`` into the runner's phases and holds nothing else;
the registry (``clsvd_jax.train.methods``) names them, and they are imported when a run of their method starts.

* ``replay``: remembers each finished task at the boundary, mixes the memory into the batches of later tasks.
* ``ewc``: measures the finished task's diagonal Fisher at the boundary, adds the quadratic penalty to the loss.
* ``lora``: trains adapters over the frozen base (``lora``: one adapter; ``olora``: one per task, with O-LoRA's
  penalty), evaluates the merged weights.
* ``gpm``: sets the ``osft`` section to gradient projection memory's preset (the constrained method does the rest).
* ``pertask``: restarts every task from the initial weights; a row of R costs one evaluation.
"""
