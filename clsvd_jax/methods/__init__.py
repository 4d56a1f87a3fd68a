"""Continual-learning baselines as small building blocks the runner composes (issue 10).

Each module holds one method's pieces, every one a pure function or a small typed state:

* ``replay``: a per-task memory of training examples and a batch source that mixes it into later tasks.
* ``ewc``: the diagonal Fisher of a finished task and the accumulated quadratic penalty.
* ``lora``: LoRA adapters on chosen matrices (sequential LoRA and O-LoRA), merged into the weights for export.
* ``gpm``: gradient projection memory as a preset of the core transform (one-sided, activation bases).
* ``pertask``: one fresh model per task (an upper bound that needs the task id): which parameters score which task.

Rank classification (scoring label options by likelihood) lives in ``clsvd_jax.train.rank_classification``.
"""
