"""Pooling heads of the ViT beyond reading a token or averaging.

Its own module so that vit.py stays the encoder; the parameter names are set
where the head is built (`MAPHead_0`, big_vision's), so moving the class
changes no checkpoint.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.layers import MlpBlock

Dtype = Any


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned `probe` token attends over all tokens."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x: [batch, tokens, hidden] -> [batch, hidden]; bias: ToMe's log sizes."""
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]))
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        name='MultiHeadDotProductAttention_0')(probe, x, deterministic=True,
                                               bias=bias)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype,
                     name='MlpBlock_0')(y, deterministic=True)
    return x[:, 0]
