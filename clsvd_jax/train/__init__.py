"""The continual-learning runner: methods, train step, evaluation, metrics, checkpoints and outputs."""

from clsvd_jax.train.methods import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
