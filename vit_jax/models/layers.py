"""Layers every encoder block shares: the transformer MLP and stochastic depth,
and the matmul the patch embedding and conv stem compute with."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[..., k] x [k, n] -> [..., n] as one `lax.dot_general`, as nn.Dense does.

  Not `@` or `jnp.dot`: int8 quantization (vit_jax.quantization, qwix)
  intercepts `lax.dot_general` to run the product on the int8 kernel, and
  `jnp.dot` would trace it inside its own jit, where static calibration
  cannot record its statistics.
  """
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout; output width = input width.

  GELU is the tanh form the released JAX ViTs use; `gelu_approximate=False`
  gives the exact erf form of the PyTorch references (GFNet, AFNO).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    dense = lambda features: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
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
