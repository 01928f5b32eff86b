"""Pooling heads of the ViT beyond reading a token or averaging.

Its own module so that vit.py stays the encoder; the parameter names are set
where the head is built (`MAPHead_0`, big_vision's), so moving the class
changes no checkpoint.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.layers import MlpBlock
from vit_jax.models.precision import get_policy


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned `probe` token attends over all tokens."""
  num_heads: int
  mlp_dim: int
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x: [batch, tokens, hidden] -> [batch, hidden]; bias: ToMe's log sizes."""
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]))
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, precision=self.precision,
        name='MultiHeadDotProductAttention_0')(probe, x, deterministic=True,
                                               bias=bias)
    y = nn.LayerNorm(epsilon=1e-6, dtype=get_policy(self.precision).activation_dtype,
                     name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, precision=self.precision,
                     name='MlpBlock_0')(y, deterministic=True)
    return x[:, 0]
