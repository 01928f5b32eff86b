"""MLP-Mixer (Tolstikhin et al., 2021) with the released checkpoints' names.

`stem` (patch conv), `MixerBlock_{i}/{LayerNorm_0, token_mixing, LayerNorm_1,
channel_mixing}` (each mixing MLP has `Dense_0`, `Dense_1`),
`pre_head_layer_norm`, `head` (zero-initialised kernel).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.precision import get_policy


class MixerMlp(nn.Module):
  """Dense -> tanh-GELU -> Dense back to the input width (flax default inits)."""
  mlp_dim: int
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    policy = get_policy(self.precision)
    dense = lambda features: nn.Dense(features, dtype=policy.activation_dtype,
                                      dot_general=policy.dot_general)
    return dense(x.shape[-1])(nn.gelu(dense(self.mlp_dim)(x)))


class MixerBlock(nn.Module):
  """Token mixing across patches, then channel mixing, each pre-LN with a residual."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, tokens, channels] -> same shape."""
    activations = get_policy(self.precision).activation_dtype
    y = nn.LayerNorm(epsilon=1e-6, dtype=activations, name='LayerNorm_0')(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MixerMlp(self.tokens_mlp_dim, self.precision, name='token_mixing')(y)
    x = x + jnp.swapaxes(y, 1, 2)
    y = nn.LayerNorm(epsilon=1e-6, dtype=activations, name='LayerNorm_1')(x)
    return x + MixerMlp(self.channels_mlp_dim, self.precision, name='channel_mixing')(y)


class MlpMixer(nn.Module):
  """Mixer: patch conv -> blocks -> LayerNorm -> global average pool -> head."""
  num_classes: int | None
  patch_size: Sequence[int]
  hidden_size: int
  num_layers: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # Mixer has no dropout.
    ph, pw = self.patch_size
    if images.shape[1] % ph or images.shape[2] % pw:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by the '
                       f'patch size {tuple(self.patch_size)}')
    policy = get_policy(self.precision)
    x = nn.Conv(self.hidden_size, (ph, pw), strides=(ph, pw), padding='VALID',
                dtype=policy.activation_dtype,
                conv_general_dilated=policy.conv_general_dilated,
                name='stem')(images.astype(policy.activation_dtype))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for i in range(self.num_layers):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, self.precision,
                     name=f'MixerBlock_{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=policy.activation_dtype,
                     name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    if self.num_classes is not None:
      x = nn.Dense(self.num_classes, dtype=policy.activation_dtype,
                   dot_general=policy.dot_general, name='head',
                   kernel_init=nn.initializers.zeros)(x)
    return x.astype(jnp.float32)
