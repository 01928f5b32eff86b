"""Multi-head dot-product attention with the released checkpoints' parameter layout.

The released ViT files store attention as four DenseGeneral projections:
`query`, `key`, `value` with kernels [hidden, heads, head_dim] and biases
[heads, head_dim], and `out` with kernel [heads, head_dim, hidden] and bias
[hidden]. Writing the module here (rather than using flax's) lets us sow the
attention probabilities for visualisation and pick the attention kernel, while the
parameter tree stays exactly the released one.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Implementations of the softmax(q k^T / sqrt(d)) v product:
#   'xla'   : explicit einsum + softmax in float32; sows the attention
#             probabilities (`intermediates/.../attention_weights`).
#   'fused' : jax.nn.dot_product_attention, which picks a fused kernel where the
#             backend has one (cuDNN flash attention on GPU for bf16/fp16) and
#             XLA's own composition elsewhere (CPU, TPU, float32 on GPU);
#             on CPU that composition is slower than 'xla' (docs/benchmarks.md),
#             so keep 'xla' there.
#             Same params and, in float32, the same numbers to ~1e-6; in bf16 a
#             fused kernel may round differently from 'xla'. It never sows
#             weights, and it falls back to the explicit path while training
#             with attention dropout > 0 (the fused call has no dropout).
ATTENTION_IMPLS = ('xla', 'fused')


class MultiHeadDotProductAttention(nn.Module):
  """Attention of `inputs_q` over `inputs_kv`, both [batch, tokens, hidden].

  Attributes:
    num_heads: number of heads; hidden size must be divisible by it.
    dropout_rate: dropout on the attention probabilities (train only).
    dtype: compute dtype; parameters stay float32.
    impl: one of ATTENTION_IMPLS. 'fused' does not sow the attention weights
      (tools that draw them clone the model with impl 'xla'; the params are the
      same) and uses the explicit path when attention dropout is active.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  impl: str = 'xla'

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, *,
               deterministic: bool) -> jax.Array:
    hidden = inputs_q.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(
          f'hidden size {hidden} is not divisible by num_heads {self.num_heads}')
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention impl {self.impl!r} not in {ATTENTION_IMPLS}')
    head_dim = hidden // self.num_heads

    def projection(name: str) -> nn.DenseGeneral:
      return nn.DenseGeneral(
          features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
          kernel_init=nn.initializers.xavier_uniform(), name=name)

    # [batch, tokens, heads, head_dim]
    query = projection('query')(inputs_q)
    key = projection('key')(inputs_kv)
    value = projection('value')(inputs_kv)

    use_dropout = not deterministic and self.dropout_rate > 0.0
    if self.impl == 'fused' and not use_dropout:
      out = jax.nn.dot_product_attention(query, key, value)
    else:
      # Heads-major copies first: XLA's CPU dot emitter is several times slower
      # on the batched products when the head axis sits between tokens and
      # features (docs/benchmarks.md), and a transpose is cheap next to either.
      query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
      scale = 1.0 / jnp.sqrt(head_dim).astype(self.dtype)
      logits = jnp.einsum('bhqd,bhkd->bhqk', query * scale, key)
      # Softmax in float32: bf16 logits lose too much in the normaliser.
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      self.sow('intermediates', 'attention_weights', weights)
      weights = weights.astype(self.dtype)
      if use_dropout:
        weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=False)
      out = jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, value), 1, 2)

    return nn.DenseGeneral(
        features=hidden, axis=(-2, -1), dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='out')(out)
