"""The runner's name for the method registry, ``clsvd_jax.methods.registry`` (a re-export).

The registry lives in a leaf module so that ``clsvd_jax.config`` can check a config's ``method`` against it without
importing the runner; ``register_method`` here and there is the same function, ``METHODS`` the same dict.
"""

from clsvd_jax.methods.registry import METHOD_SECTIONS, METHODS, Method, get_method, method_names, register_method

__all__ = ["METHOD_SECTIONS", "METHODS", "Method", "get_method", "method_names", "register_method"]
