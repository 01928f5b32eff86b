"""Token Merging (ToMe; Bolya et al., ICLR 2023): fewer tokens in every block.

Each encoder block, between its attention and its MLP, merges `r` pairs of
similar tokens, so the MLP and every later block run on fewer tokens; nothing
is learned, so a released ViT runs faster as it is and trains the same way.

- Bipartite soft matching: tokens alternate into sets A (even positions) and
  B (odd); the similarity is the cosine of the block's attention keys averaged
  over heads; each A token picks its most similar B token, and the r A tokens
  with the best matches are averaged into them.
- Sizes: every token carries how many patches it stands for ([batch, tokens,
  1], all ones before the first block). A merge is the size-weighted average
  and the sizes add, so the sizes always sum to the input's token count.
- Proportional attention: every block adds log(size) over the keys to its
  attention logits, so a token of size s weighs as s copies of itself would.
- Prefix tokens (the cls token) are never merged and stay first: the result is
  [cls, unmerged A tokens, B tokens], each group in its original order.

The rule on r (`merge_schedule`): the first block must be able to merge r
tokens, r <= (tokens - prefix) // 2, else the model is refused; later blocks
merge min(r, (tokens_now - prefix) // 2), the paper's clamp.
"""

from typing import Any

import jax
import jax.numpy as jnp

# Classifiers whose output is per token: with merging their count and meaning
# (which patch a row stands for) change from block to block.
PER_TOKEN_CLASSIFIERS = ('unpooled', 'token_unpooled')


def check_tome(vit: Any) -> None:
  """Raises ValueError for a ViT (Module or ConfigDict) whose settings cannot
  merge tokens; the token count is checked by `merge_schedule`."""
  r = getattr(vit, 'tome_r', 0)  # A config saved before ToMe has none.
  if not isinstance(r, int) or isinstance(r, bool) or r < 0:
    raise ValueError(f'tome_r must be an integer >= 0 (tokens merged per '
                     f'block), got {r!r}')
  if not r:
    return
  what = f'tome_r={r} (token merging)'
  if vit.token_mixer != 'attention':
    raise ValueError(f'{what} needs attention blocks: token_mixer '
                     f'{vit.token_mixer!r} mixes the fixed patch grid in the '
                     'frequency domain, which merged tokens no longer form')
  if vit.attention_impl == 'favor':
    raise ValueError(f"{what} cannot run with attention_impl='favor': FAVOR+ "
                     'forms no attention logits for the log-size bias of '
                     "proportional attention; use 'xla' or 'fused'")
  if vit.scan_layers:
    raise ValueError(f'{what} cannot run with scan_layers=True: every block '
                     'has fewer tokens than the last, and a scanned block '
                     'needs one shape')
  if vit.classifier in PER_TOKEN_CLASSIFIERS:
    raise ValueError(f'{what} cannot take classifier {vit.classifier!r}: its '
                     'per-token outputs assume one row per patch, and merging '
                     "changes their count; use 'token', 'gap' or 'map'")


def merge_schedule(r: int, num_tokens: int, num_prefix: int,
                   num_layers: int) -> list[int]:
  """Tokens merged in each block: r, clamped to what a block can merge.

  Raises ValueError if even the first block cannot merge r (the A set, less
  the prefix, has fewer than r tokens to give).
  """
  if r > (num_tokens - num_prefix) // 2:
    raise ValueError(
        f'tome_r={r} removes more tokens than block 0 has to merge: it has '
        f'{num_tokens} tokens ({num_prefix} prefix), so at most '
        f'{(num_tokens - num_prefix) // 2} per block')
  schedule = []
  for _ in range(num_layers):
    schedule.append(min(r, (num_tokens - num_prefix) // 2))
    num_tokens -= schedule[-1]
  return schedule


def matching_flops(num_tokens: int, r: int, key_dim: int) -> float:
  """FLOPs of one image's matching in a block (the A x B cosine product).

  The key mean, normalisation and weighted average are elementwise, a few
  tokens x hidden each, and not counted (as norms are not in flops.py).
  """
  if not r:
    return 0.0
  return 2.0 * ((num_tokens + 1) // 2) * (num_tokens // 2) * key_dim


def size_bias(size: jax.Array) -> jax.Array:
  """Proportional attention's logits bias: [batch, tokens, 1] sizes ->
  log(size) over the keys, [batch, 1, 1, tokens] ([b, heads, q, k])."""
  return jnp.log(size.astype(jnp.float32))[:, None, None, :, 0]


def weighted_mean(x: jax.Array, size: jax.Array) -> jax.Array:
  """Mean over tokens of x [batch, tokens, hidden], each token counted `size`
  times: the mean over the patches the tokens stand for. -> [batch, hidden]."""
  size = size.astype(jnp.float32)
  pooled = jnp.sum(x.astype(jnp.float32) * size, 1) / jnp.sum(size, 1)
  return pooled.astype(x.dtype)


def bipartite_soft_matching(metric: jax.Array, r: int, num_prefix: int
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Which tokens to merge: (unmerged A indices [b, na - r], merged A indices
  [b, r], their B partners [b, r]), indices into the A and B halves.

  metric: [batch, tokens, channels] (the keys averaged over heads); only its
  direction matters. The choice is discrete, so no gradient flows through it.
  num_prefix: 0, or 1 for a cls token (token 0, the first of A).
  """
  if num_prefix not in (0, 1):
    raise ValueError(f'ToMe protects one cls token or none, got {num_prefix}')
  metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
  metric = metric * jax.lax.rsqrt(
      jnp.sum(metric * metric, -1, keepdims=True) + 1e-12)
  scores = jnp.einsum('bic,bjc->bij', metric[:, ::2], metric[:, 1::2])
  if num_prefix:  # The cls token is A's first row: it never picks a partner.
    scores = scores.at[:, 0].set(-jnp.inf)
  best = jnp.max(scores, -1)
  partner = jnp.argmax(scores, -1)
  order = jnp.argsort(-best, axis=-1)  # Stable: ties keep position order.
  unmerged = jnp.sort(order[:, r:], axis=-1)  # Original order, prefix first.
  merged = order[:, :r]
  return unmerged, merged, jnp.take_along_axis(partner, merged, -1)


def merge_tokens(x: jax.Array, size: jax.Array, metric: jax.Array, r: int,
                 num_prefix: int) -> tuple[jax.Array, jax.Array]:
  """Merges r tokens of x [batch, tokens, hidden] (sizes [batch, tokens, 1])
  into their best matches by size-weighted average.

  Returns x and size with tokens - r rows: [prefix, unmerged A, B]. Gradients
  flow to every input token through the averages.
  """
  if not r:
    return x, size
  unmerged, merged, partner = bipartite_soft_matching(metric, r, num_prefix)
  size = size.astype(jnp.float32)
  # Sum x * size and size together, then divide: one gather and scatter.
  both = jnp.concatenate([x.astype(jnp.float32) * size, size], -1)
  a, b = both[:, ::2], both[:, 1::2]
  pick = lambda t, idx: jnp.take_along_axis(t, idx[..., None], 1)
  b = jax.vmap(lambda dst, i, src: dst.at[i].add(src))(b, partner, pick(a, merged))
  both = jnp.concatenate([pick(a, unmerged), b], 1)
  size = both[..., -1:]
  return (both[..., :-1] / size).astype(x.dtype), size
