"""Performer's FAVOR+ (Choromanski et al., ICLR 2021): softmax attention in linear time.

exp(q.k) is estimated as phi(q).phi(k) with m random features, so
softmax(q k^T) v becomes phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1): the
[tokens, tokens] matrix is never formed and the cost is ~8 * tokens * m * d
per head instead of ~4 * tokens^2 * d. It pays only beyond roughly 2m tokens.

Two feature maps (the reference `performer/fast_attention` names):

- 'positive' (FAVOR+, the default): phi(x) = exp(w.x - |x|^2/2) / sqrt(m) with
  the rows w of an orthogonal Gaussian matrix (orthogonal blocks, row lengths
  drawn from the chi distribution of Gaussian rows). Positive, so the
  normaliser is a sum of positive terms.
- 'trig': sin/cos random Fourier features, exp(|x|^2/2) [cos(w.x), sin(w.x)] /
  sqrt(m) (2m features; unbiased but not positive, hence less stable).

Computed as is, exp() over- and underflows as soon as |q| and |k| grow in
training, and a query whose largest features meet only underflowed key
features gets a zero normaliser (a ViT-test FAVOR+ run went NaN at step 1022
on Fashion-MNIST). The products phi_m(q) phi_m(k) are unchanged when feature m
of every key is divided by c_m and feature m of every query multiplied by it,
and the ratio is unchanged by any factor per query or per (batch, head) of
the keys. So: each key feature is shifted to a maximum of exactly 1 over the
keys, that shift is added to the queries' exponents, and each query's features
to a maximum of 1; then the normaliser is >= 1/m, with nothing to overflow.
(trig: exp(|q|^2/2) is a per-query factor and is dropped, the keys' is taken
relative to their largest.) The shifts' gradients are stopped: the value does
not depend on them. The reference code instead adds 1e-4 to every feature,
which biases the estimate where features are small (its error stopped
falling with m in tests/test_token_mixers.py); that is left out.

The random matrix is a pure function of a key, never a stored variable, so
params stay those of softmax attention (a released ViT loads as is) and
`model.apply({'params': p}, x)` keeps working. One matrix [m, head_dim] is
shared by all heads of a layer, as in the reference.
"""

import math

import jax
import jax.numpy as jnp

FEATURE_KERNELS = ('positive', 'trig')

def check_favor(features: int, kernel: str) -> None:
  """Raises ValueError for a feature count or kernel FAVOR+ cannot use."""
  if not isinstance(features, int) or features < 1:
    raise ValueError(f'favor_features must be an integer >= 1, got {features!r}')
  if kernel not in FEATURE_KERNELS:
    raise ValueError(f'favor_kernel {kernel!r} not in {FEATURE_KERNELS}')


def orthogonal_gaussian(key: jax.Array, num_rows: int, dim: int) -> jax.Array:
  """[num_rows, dim] random matrix: orthogonal rows in blocks of `dim`, with the
  norms of Gaussian rows (so each row is marginally N(0, I))."""
  block_key, norm_key = jax.random.split(key)
  num_blocks = -(-num_rows // dim)
  gaussian = jax.random.normal(block_key, (num_blocks, dim, dim), jnp.float32)
  q = jax.vmap(_gram_schmidt)(gaussian)
  rows = jnp.swapaxes(q, 1, 2).reshape(num_blocks * dim, dim)[:num_rows]
  norms = jnp.linalg.norm(
      jax.random.normal(norm_key, (num_rows, dim), jnp.float32), axis=1)
  return norms[:, None] * rows


def _gram_schmidt(matrix: jax.Array) -> jax.Array:
  """Q of the QR factorisation of a square `matrix`, with R's diagonal positive.

  Only then is Q of a Gaussian matrix uniform (Haar), i.e. every row points in
  a uniformly random direction; a LAPACK QR leaves R's signs arbitrary, and the
  positive estimate built on it was biased (its error levelled off with m).
  Written as Gram-Schmidt (each column projected out twice, which float32
  needs) rather than `jnp.linalg.qr`: redrawn inside every train step, the
  LAPACK call deadlocked XLA:CPU's concurrency-optimised scheduler (a 4-layer
  FAVOR+ train step never returned; jax 0.10.2), and d steps of d x d
  products cost nothing next to attention.
  """
  def orthogonalise(q, column):
    v = matrix[:, column]
    for _ in range(2):  # Columns past `column` are still zero in q.
      v = v - q @ (q.T @ v)
    return q.at[:, column].set(v / jnp.linalg.norm(v)), None

  q, _ = jax.lax.scan(orthogonalise, jnp.zeros_like(matrix),
                      jnp.arange(matrix.shape[-1]))
  return q


def feature_maps(q: jax.Array, k: jax.Array, projection: jax.Array,
                 kernel: str) -> tuple[jax.Array, jax.Array]:
  """(phi(q), phi(k)) for q, k [batch, tokens, heads, d] (scaled by d^-1/4),
  up to factors that cancel in the attention ratio (see the module doc)."""
  num_features = projection.shape[0]
  q_proj = jnp.einsum('blhd,md->blhm', q, projection)
  k_proj = jnp.einsum('blhd,md->blhm', k, projection)
  half_sq_norm = lambda x: 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  shift = lambda x, axis: jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  if kernel == 'positive':
    k_exp = k_proj - half_sq_norm(k)
    per_feature = shift(k_exp, 1)  # Over the keys, per feature.
    q_exp = q_proj - half_sq_norm(q) + per_feature
    q_exp -= shift(q_exp, -1)  # Over the features, per query.
    k_exp -= per_feature
    return (jnp.exp(q_exp) / math.sqrt(num_features),
            jnp.exp(k_exp) / math.sqrt(num_features))
  if kernel == 'trig':
    trig = lambda x: jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=-1)
    k_scale = jnp.exp(half_sq_norm(k) - shift(half_sq_norm(k), 1))
    return trig(q_proj) / math.sqrt(num_features), k_scale * trig(k_proj)
  raise ValueError(f'favor_kernel {kernel!r} not in {FEATURE_KERNELS}')


def favor_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    rng: jax.Array, num_features: int,
                    kernel: str = 'positive') -> jax.Array:
  """Estimated softmax(q k^T / sqrt(d)) v; inputs [batch, tokens, heads, d].

  Computed in float32 (the exp features and the normaliser need the range) and
  returned in the dtype of `value`.
  """
  head_dim = query.shape[-1]
  projection = orthogonal_gaussian(rng, num_features, head_dim)
  scale = head_dim ** -0.25  # q.k / sqrt(d) == (q d^-1/4).(k d^-1/4)
  q, k = feature_maps(query.astype(jnp.float32) * scale,
                      key.astype(jnp.float32) * scale, projection, kernel)
  kv = jnp.einsum('blhm,blhd->bhmd', k, value.astype(jnp.float32))
  numerator = jnp.einsum('blhm,bhmd->blhd', q, kv)
  denominator = jnp.einsum('blhm,bhm->blh', q, jnp.sum(k, axis=1))
  return (numerator / denominator[..., None]).astype(value.dtype)
