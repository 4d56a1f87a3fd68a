"""clsvd_jax: continual full fine-tuning of LLMs with orthogonal-complement updates."""

__version__ = "0.1.0"
