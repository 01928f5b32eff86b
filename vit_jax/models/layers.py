"""Layers every encoder block shares: the transformer MLP and stochastic depth."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.precision import get_policy



class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout; output width = input width.

  GELU is the tanh form the released JAX ViTs use; `gelu_approximate=False`
  gives the exact erf form of the PyTorch references (GFNet, AFNO).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  precision: str = 'float32'  # A precision.POLICIES name.
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    policy = get_policy(self.precision)
    dense = lambda features: nn.Dense(
        features, dtype=policy.activation_dtype, dot_general=policy.dot_general,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim)(x), approximate=self.gelu_approximate)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1])(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example during training.

  `rate` is a call argument, not a field: under `nn.scan` each layer's rate is
  a traced scalar sliced from the scanned input.
  """

  @nn.compact
  def __call__(self, x: jax.Array, rate: Any, *, deterministic: bool) -> jax.Array:
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
