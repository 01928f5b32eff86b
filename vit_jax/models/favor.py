"""Performer's FAVOR+ (Choromanski et al., ICLR 2021): softmax attention in linear time.

exp(q.k) is estimated as phi(q).phi(k) with m random features, so
softmax(q k^T) v becomes phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1): the
[tokens, tokens] matrix is never formed and the cost is ~8 * tokens * m * d
per head instead of ~4 * tokens^2 * d. It pays only beyond roughly 2m tokens.

Two feature maps (the reference `performer/fast_attention` names):

- 'positive' (FAVOR+, the default): phi(x) = exp(w.x - |x|^2/2) / sqrt(m) with
  the rows w of an orthogonal Gaussian matrix (orthogonal blocks from a QR,
  row lengths drawn from the chi distribution of Gaussian rows). Positive, so
  the normaliser never vanishes. A max is subtracted inside the exp for
  stability (per query token; over all keys for the keys); it cancels in the
  ratio. Its gradient is stopped, since it changes nothing but rounding.
- 'trig': sin/cos random Fourier features, exp(|x|^2/2) [cos(w.x), sin(w.x)] /
  sqrt(m) (2m features; unbiased but not positive, hence less stable).

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


def feature_map(x: jax.Array, projection: jax.Array, kernel: str, *,
                is_query: bool) -> jax.Array:
  """phi(x) for x [batch, tokens, heads, d] (already scaled by d^-1/4)."""
  num_features = projection.shape[0]
  proj = jnp.einsum('blhd,md->blhm', x, projection)
  half_sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if kernel == 'positive':
    # Any factor shared by all features of a query, or by all features of all
    # keys, cancels in the ratio: take out the largest exponent so the biggest
    # feature is exactly 1 (no overflow, no all-zero row).
    exponent = proj - half_sq_norm
    axes = (-1,) if is_query else (1, -1)
    exponent -= jax.lax.stop_gradient(jnp.max(exponent, axis=axes, keepdims=True))
    return jnp.exp(exponent) / math.sqrt(num_features)
  if kernel == 'trig':
    scale = jnp.exp(half_sq_norm) / math.sqrt(num_features)
    return scale * jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], axis=-1)
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
  q = feature_map(query.astype(jnp.float32) * scale, projection, kernel,
                  is_query=True)
  k = feature_map(key.astype(jnp.float32) * scale, projection, kernel,
                  is_query=False)
  kv = jnp.einsum('blhm,blhd->bhmd', k, value.astype(jnp.float32))
  numerator = jnp.einsum('blhm,bhmd->blhd', q, kv)
  denominator = jnp.einsum('blhm,bhm->blh', q, jnp.sum(k, axis=1))
  return (numerator / denominator[..., None]).astype(value.dtype)
