"""Continual-learning baselines as small building blocks the runner composes (issue 10).

Each module holds one method's pieces, every one a pure function or a small typed state, and names the runner
phase it plugs into:

* ``replay``: a per-task memory of training examples (boundary: ``remember`` the finished task; checkpoint meta:
  ``ReplayMemory.to_dict``) and a batch source that mixes it into later tasks (train: ``ReplayBatchIterator`` in
  place of ``BatchIterator``).
* ``ewc``: the diagonal Fisher of a finished task (boundary: ``fisher_diagonal`` + ``consolidate``; checkpoint
  arrays: ``EwcState``) and the accumulated quadratic penalty (train step: ``penalty`` added to the loss).
* ``lora``: LoRA adapters on chosen matrices, sequential LoRA and O-LoRA (train step: ``merge`` inside the loss,
  ``olora_penalty``, ``only_active_slot`` optimizer; boundary: ``set_active_slot``; evaluation: merged params;
  end: ``export_merged``).
* ``gpm``: gradient projection memory as a preset of the core transform (config: ``gpm_config``; nothing else).
* ``pertask``: one fresh model per task (boundary: restart from the initial params; evaluation: ``PerTaskPlan``
  says which parameters score which task, so a row costs one evaluation).

The method registry (``registry``: each method's stages, config sections and runner hooks, by name) is a leaf module
here too, so ``clsvd_jax.config`` can validate a method name without importing the runner.

Rank classification (scoring label options by likelihood, for every method) lives in
``clsvd_jax.train.rank_classification``.
"""
