"""Precision policies: which dtype each kind of operation computes in.

One name picks a policy everywhere a user chooses one (`config.model.precision`,
`vit_jax.tools.benchmark --precision`):

- `float32`: everything in float32 (the default; the released checkpoints'
  numerics).
- `mixed_bf16`: the products (Dense, DenseGeneral, attention's q.k and p.v,
  the patch embedding, the conv stem, the hybrid's ResNet convolutions) take
  bfloat16 inputs and accumulate and return float32, in the forward pass and in
  both backward products (input and weight gradients). LayerNorm, softmax,
  GELU, the residual stream, the loss, the parameters and the optimizer stay
  float32. The products are what bf16 hardware speeds up (AVX512-BF16 and AMX
  on CPUs, tensor cores on GPUs); bf16 elementwise work gains little there and
  on a CPU is emulated, so it stays float32.
- `bfloat16`: all activations in bfloat16 (parameters stay float32 and are cast
  where used; attention logits and softmax stay float32): what TPUs want.

Parameters are float32 under every policy, so a checkpoint trained under one
loads and resumes under another.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

POLICIES = ('float32', 'mixed_bf16', 'bfloat16')
DotGeneral = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Policy:
  """A precision policy: the activation dtype and the products' input dtype."""
  name: str
  activation_dtype: Any
  product_dtype: Any

  @property
  def mixed(self) -> bool:
    """Products in a narrower dtype than the activations around them."""
    return self.product_dtype != self.activation_dtype

  @property
  def dot_general(self) -> DotGeneral | None:
    """The `dot_general` for flax's Dense/DenseGeneral: None (flax's own, the
    `jax.lax.dot_general` that int8 quantization intercepts) unless mixed."""
    return mixed_dot_general if self.mixed else None

  @property
  def conv_general_dilated(self) -> DotGeneral | None:
    """The `conv_general_dilated` for flax's Conv: None unless mixed."""
    return mixed_conv_general_dilated if self.mixed else None

  def matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """[..., m, k] x [..., k, n] -> [..., m, n], leading axes batched (equal
    ranks) or `b` a [k, n] matrix; in the policy's product dtype."""
    batch = tuple(range(b.ndim - 2))  # None for a [k, n] matrix.
    dims = (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch))
    if self.mixed:
      return mixed_dot_general(a, b, dims) if b.ndim == 2 else _mixed_matmul(a, b)
    # lax.dot_general looked up at call time: int8 quantization intercepts it.
    return jax.lax.dot_general(a, b, dims)


_POLICIES = {
    'float32': Policy('float32', jnp.float32, jnp.float32),
    'mixed_bf16': Policy('mixed_bf16', jnp.float32, jnp.bfloat16),
    'bfloat16': Policy('bfloat16', jnp.bfloat16, jnp.bfloat16),
}


def get_policy(name: str) -> Policy:
  """The policy called `name`; ValueError naming the valid ones otherwise."""
  if name not in _POLICIES:
    raise ValueError(f'precision {name!r} is not a policy; choose one of '
                     f'{", ".join(POLICIES)}')
  return _POLICIES[name]


def check_backend(name: str, backend: str) -> None:
  """Raises ValueError if `backend` cannot run policy `name`'s bf16 products.

  Every XLA backend this project runs on (CPU, GPU from compute capability 8.0,
  TPU) computes bf16 products; older GPUs emulate them slowly or not at all.
  """
  policy = get_policy(name)
  if policy.product_dtype != jnp.bfloat16 or backend != 'gpu':
    return
  for device in jax.local_devices(backend='gpu'):
    capability = getattr(device, 'compute_capability', None)
    if capability is not None and float(capability) < 8.0:
      raise ValueError(
          f'precision {name!r} needs bfloat16 products, which {device.device_kind} '
          f'(compute capability {capability}) lacks (they need 8.0, Ampere, '
          "or newer); use precision='float32'")


_BF16 = jnp.bfloat16
_F32 = jnp.float32


def _batch_dims(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 2))


def _product(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """bf16 x bf16 -> float32 dot_general over the leading batch axes."""
  return jax.lax.dot_general(
      a.astype(_BF16), b.astype(_BF16), (((contract[0],), (contract[1],)),
                                         (_batch_dims(a), _batch_dims(b))),
      preferred_element_type=_F32)


def _mixed_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """The mixed product with bf16 backward products; gradients in the inputs'
  dtypes (float32 under mixed_bf16)."""
  return _mixed_matmul_vjp(a.dtype, b.dtype, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_matmul_vjp(a_dtype, b_dtype, a, b):
  del a_dtype, b_dtype
  return _product(a, b, (a.ndim - 1, b.ndim - 2))


def _mixed_matmul_fwd(a_dtype, b_dtype, a, b):
  del a_dtype, b_dtype
  a16, b16 = a.astype(_BF16), b.astype(_BF16)
  # The residuals are bf16 (half the memory), `a` already transposed for the
  # weight-gradient product.
  return _product(a16, b16, (a.ndim - 1, b.ndim - 2)), (_swap_last_two(a16), b16)


def _mixed_matmul_bwd(a_dtype, b_dtype, residuals, g):
  a16_t, b16 = residuals
  g16 = g.astype(_BF16)
  # Without this rule JAX's transpose of a bf16 x bf16 -> f32 product would
  # multiply the float32 cotangent by a bf16 operand, i.e. in float32.
  da = _product(g16, b16, (g.ndim - 1, b16.ndim - 1))        # g b^T: [..., m, k]
  db = _product(a16_t, g16, (a16_t.ndim - 1, g.ndim - 2))    # a^T g: [..., k, n]
  return da.astype(a_dtype), db.astype(b_dtype)


def _swap_last_two(x: jax.Array) -> jax.Array:
  """[..., m, k] -> [..., k, m] as a copy XLA cannot fold into the next product.

  The weight-gradient product a^T g contracts the token axis, the leading axis
  of both operands. XLA folds a plain transpose into the product's layout, and
  XLA CPU runs that layout in bf16 at its float32 rate (its fast bf16 kernels
  take operands contracting their last axis, or the product's rhs its first).
  Splitting the token axis first, [..., m/c, c, k] -> [..., k, m/c, c], makes
  the transpose a real copy, and the product the fast form (docs/benchmarks.md
  has the rates). With no factor of the token axis to split by, the plain
  transpose.
  """
  *lead, m, k = x.shape
  chunk = next((c for c in (8, 4, 2) if m % c == 0 and m > c), None)
  if chunk is None:
    return jnp.swapaxes(x, -1, -2)
  n = len(lead)
  split = x.reshape(*lead, m // chunk, chunk, k)
  order = tuple(range(n)) + (n + 2, n, n + 1)
  return jnp.transpose(split, order).reshape(*lead, k, m)


_mixed_matmul_vjp.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def mixed_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                      precision: Any = None, preferred_element_type: Any = None
                      ) -> jax.Array:
  """flax's `dot_general` hook under `mixed_bf16`.

  Dense and DenseGeneral contract trailing axes of the input with leading axes
  of the kernel, without batch axes: that becomes one 2-D mixed product (a
  DenseGeneral over two axes, attention's `out`, included: XLA CPU has no bf16
  dot with two contracting axes). Any other form casts and accumulates in
  float32 with JAX's own gradient.
  """
  del preferred_element_type  # Always float32.
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  n = len(lhs_contract)
  if (not lhs_batch and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
      and tuple(rhs_contract) == tuple(range(n))):
    k = math.prod(lhs.shape[lhs.ndim - n:])
    out = _mixed_matmul(lhs.reshape(-1, k), rhs.reshape(k, -1))
    return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])
  return jax.lax.dot_general(lhs.astype(_BF16), rhs.astype(_BF16),
                             dimension_numbers, precision=precision,
                             preferred_element_type=_F32)


def mixed_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any,
                               **kwargs: Any) -> jax.Array:
  """flax's `conv_general_dilated` hook under `mixed_bf16`: bf16 inputs,
  float32 accumulation and output; gradients through a bf16 cotangent."""
  kwargs.pop('preferred_element_type', None)
  conv = lambda x, w, preferred: jax.lax.conv_general_dilated(
      x, w, *args, **kwargs, preferred_element_type=preferred)

  @jax.custom_vjp
  def mixed_conv(x, w):
    return conv(x.astype(_BF16), w.astype(_BF16), _F32)

  x_dtype, w_dtype = lhs.dtype, rhs.dtype

  def fwd(x, w):
    x16, w16 = x.astype(_BF16), w.astype(_BF16)
    return conv(x16, w16, _F32), (x16, w16)

  def bwd(residuals, g):
    x16, w16 = residuals
    # The transpose of the bf16 convolution, fed a bf16 cotangent: both
    # gradient convolutions take bf16 inputs (their outputs rounded to bf16,
    # as under torch.autocast).
    _, pullback = jax.vjp(lambda x, w: conv(x, w, None), x16, w16)
    dx, dw = pullback(g.astype(_BF16))
    return dx.astype(x_dtype), dw.astype(w_dtype)

  mixed_conv.defvjp(fwd, bwd)
  return mixed_conv(lhs, rhs)
