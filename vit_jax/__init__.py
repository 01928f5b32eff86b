"""vit_jax: Vision Transformers in JAX/Flax, compatible with the released checkpoints."""

__version__ = '0.1.0'
