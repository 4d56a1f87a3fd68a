"""The continual-learning runner: methods, train step, evaluation, metrics, checkpoints and outputs.

Where to start reading: ``runner.run`` is the loop over the phases in ``phases/`` (prepare, start, then per stage
boundary, train_task, evaluate, and finally write); ``run_state.RunState`` is where a run stands (the checkpoint's
``meta.json``) and ``run_state.TrainState`` its arrays; ``context.RunContext`` is what stays fixed for a run.
Around them: ``step`` (the jitted train step), ``layout`` (one device or a mesh), ``checkpoint``, ``run_dir``,
``watchdog``, ``tensorboard``.
"""

from clsvd_jax.train.methods import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
