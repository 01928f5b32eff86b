"""Multi-head dot-product attention with the released checkpoints' parameter layout.

The released ViT files store attention as four DenseGeneral projections:
`query`, `key`, `value` with kernels [hidden, heads, head_dim] and biases
[heads, head_dim], and `out` with kernel [heads, head_dim, hidden] and bias
[hidden]. Writing the module here (rather than using flax's) lets us sow the
attention probabilities for visualisation and pick the attention kernel, while the
parameter tree stays exactly the released one.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import favor
from vit_jax.models.precision import get_policy

# Implementations of the softmax(q k^T / sqrt(d)) v product:
#   'xla'   : explicit einsum + softmax in float32; sows the attention
#             probabilities (`intermediates/.../attention_weights`).
#   'fused' : jax.nn.dot_product_attention: cuDNN's fused flash attention on
#             GPU when the policy's products are bf16 (mixed_bf16, bfloat16) and
#             no ToMe bias is added (asked for by name: jax's default is XLA's
#             composition everywhere), XLA's own composition elsewhere (CPU,
#             TPU, float32 on GPU);
#             on CPU that composition is slower than 'xla' (docs/benchmarks.md),
#             so keep 'xla' there.
#             Same params and, in float32, the same numbers to ~1e-6; in bf16 a
#             fused kernel may round differently from 'xla'. It never sows
#             weights, and it falls back to the explicit path while training
#             with attention dropout > 0 (the fused call has no dropout).
#   'favor' : Performer's FAVOR+ random-feature estimate (vit_jax.models.favor),
#             linear in the token count; same params, approximate numbers,
#             nothing sown, no attention dropout (there is no attention matrix).
#             Its random features come from the `favor` rng stream in training
#             (the train step folds it with the step) and from `favor_seed`
#             in evaluation or when no such stream is given.
ATTENTION_IMPLS = ('xla', 'fused', 'favor')


def check_attention(impl: str, dropout_rate: float, favor_features: int,
                    favor_kernel: str) -> None:
  """Raises ValueError for an attention setting the module cannot run."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention impl {impl!r} not in {ATTENTION_IMPLS}')
  if impl == 'favor':
    favor.check_favor(favor_features, favor_kernel)
    if dropout_rate:
      raise ValueError('attention_dropout_rate must be 0 with FAVOR+ '
                       f"(attention_impl='favor'), got {dropout_rate}: it never "
                       'forms the attention matrix that dropout would act on')


class MultiHeadDotProductAttention(nn.Module):
  """Attention of `inputs_q` over `inputs_kv`, both [batch, tokens, hidden].

  Attributes:
    num_heads: number of heads; hidden size must be divisible by it unless
      `head_dim` is given.
    head_dim: width of one head; None: hidden // num_heads. A model whose
      pruned heads were dropped (vit_jax.pruning) keeps its heads' width.
    dropout_rate: dropout on the attention probabilities (train only).
    precision: a precision.POLICIES name; parameters stay float32.
    impl: one of ATTENTION_IMPLS. 'fused' does not sow the attention weights
      (tools that draw them clone the model with impl 'xla'; the params are the
      same) and uses the explicit path when attention dropout is active.
    favor_features: random features per head for impl 'favor'.
    favor_kernel: 'positive' (FAVOR+) or 'trig' (sin/cos) features.
    favor_seed: seed of the features outside training.

  Token merging (vit_jax.models.tome) passes `bias`, added to the logits
  before the softmax (log token sizes over the keys: proportional attention),
  and asks for `return_key_mean`: the call then returns (out, keys averaged
  over heads [batch, kv_tokens, head_dim]), the similarity ToMe matches on.
  """
  num_heads: int
  dropout_rate: float = 0.0
  precision: str = 'float32'  # A precision.POLICIES name.
  impl: str = 'xla'
  favor_features: int = 256
  favor_kernel: str = 'positive'
  favor_seed: int = 0
  head_dim: int | None = None

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, *,
               deterministic: bool, bias: jax.Array | None = None,
               return_key_mean: bool = False
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """bias: broadcastable to [batch, heads, q_tokens, kv_tokens] (not FAVOR+)."""
    hidden = inputs_q.shape[-1]
    if self.head_dim is None and hidden % self.num_heads:
      raise ValueError(
          f'hidden size {hidden} is not divisible by num_heads {self.num_heads}')
    check_attention(self.impl, self.dropout_rate, self.favor_features,
                    self.favor_kernel)
    head_dim = self.head_dim or hidden // self.num_heads
    policy = get_policy(self.precision)

    def projection(name: str) -> nn.DenseGeneral:
      return nn.DenseGeneral(
          features=(self.num_heads, head_dim), axis=-1,
          dtype=policy.activation_dtype, dot_general=policy.dot_general,
          kernel_init=nn.initializers.xavier_uniform(), name=name)

    # [batch, tokens, heads, head_dim]
    query = projection('query')(inputs_q)
    key = projection('key')(inputs_kv)
    value = projection('value')(inputs_kv)

    key_mean = key.mean(axis=2) if return_key_mean else None
    use_dropout = not deterministic and self.dropout_rate > 0.0
    if self.impl == 'favor':
      if bias is not None:
        raise ValueError('FAVOR+ forms no attention logits to add a bias to')
      rng = (self.make_rng('favor') if not deterministic and self.has_rng('favor')
             else jax.random.key(self.favor_seed))
      out = favor.favor_attention(query, key, value, rng=rng,
                                  num_features=self.favor_features,
                                  kernel=self.favor_kernel)
    elif self.impl == 'fused' and not use_dropout:
      # Its logits are float32 whatever the inputs: the bias stays float32.
      # Products in the policy's dtype (bf16 is what cuDNN's fused kernel takes).
      cudnn = (jax.default_backend() == 'gpu' and bias is None
               and policy.product_dtype == jnp.bfloat16)
      out = jax.nn.dot_product_attention(
          *(x.astype(policy.product_dtype) for x in (query, key, value)),
          bias=bias, implementation='cudnn' if cudnn else None,
      ).astype(policy.activation_dtype)
    else:
      # Heads-major copies first: XLA's CPU dot emitter is several times slower
      # on the batched products when the head axis sits between tokens and
      # features (docs/benchmarks.md), and a transpose is cheap next to either.
      query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
      scale = 1.0 / jnp.sqrt(head_dim).astype(query.dtype)
      # [b, h, q, d] x [b, h, d, k]: XLA folds the transpose into the product.
      logits = policy.matmul(query * scale, jnp.swapaxes(key, -1, -2))
      # Softmax in float32: bf16 logits lose too much in the normaliser.
      logits = logits.astype(jnp.float32)
      if bias is not None:
        logits = logits + bias
      weights = jax.nn.softmax(logits, axis=-1)
      self.sow('intermediates', 'attention_weights', weights)
      weights = weights.astype(policy.activation_dtype)
      if use_dropout:
        weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=False)
      out = jnp.swapaxes(policy.matmul(weights, value), 1, 2)

    out = nn.DenseGeneral(
        features=hidden, axis=(-2, -1), dtype=policy.activation_dtype,
        dot_general=policy.dot_general,
        kernel_init=nn.initializers.xavier_uniform(), name='out')(out)
    return (out, key_mean) if return_key_mean else out
