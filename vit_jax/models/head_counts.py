"""Attention head counts per encoder block: a ViT whose pruned heads were dropped.

Head pruning (vit_jax.pruning, method 'heads') zeroes whole heads, a different
number in each block; `python -m vit_jax.tools.export --drop_pruned_heads`
then removes them from the file, so block i keeps `num_heads[i]` heads. Every
head keeps its width, which `hidden_size // num_heads` no longer gives: a
model with per-block counts states `head_dim` too. The query kernels of a
file ([hidden, heads, head_dim] per block) say both, so loading a released
file (vit_jax.tools.loading) reads them off its shapes (`heads_from_params`).

A block's parameter shapes then differ from block to block, which one
`nn.scan` over identical blocks cannot hold: per-block counts need
`scan_layers=False`. The MAP head's own attention was never pruned: it keeps
hidden_size // head_dim heads (`pooling_heads`).
"""

from typing import Any, Mapping

from vit_jax.config_checks import is_int

_ATTENTION = 'MultiHeadDotProductAttention_1'


def is_per_block(num_heads: Any) -> bool:
  return isinstance(num_heads, (tuple, list))


def check_heads(vit: Any) -> None:
  """Raises ValueError for head settings of a ViT (Module or ConfigDict) that
  cannot build."""
  heads, head_dim = vit.num_heads, getattr(vit, 'head_dim', None)
  if head_dim is not None and not (is_int(head_dim) and head_dim > 0):
    raise ValueError(f'head_dim must be a positive integer or None '
                     f'(hidden_size // num_heads), got {head_dim!r}')
  if head_dim and vit.classifier == 'map' and vit.hidden_size % head_dim:
    raise ValueError(f'head_dim {head_dim} must divide hidden_size '
                     f'{vit.hidden_size}: the MAP head has hidden_size // head_dim '
                     'heads')
  if not is_per_block(heads):
    if not (is_int(heads) and heads > 0):
      raise ValueError(f'num_heads must be a positive integer or one per '
                       f'encoder block, got {heads!r}')
    return
  if len(heads) != vit.num_layers or not all(is_int(h) and h > 0 for h in heads):
    raise ValueError(f'num_heads per block must be {vit.num_layers} positive '
                     f'integers (num_layers), got {tuple(heads)}')
  if vit.token_mixer != 'attention':
    raise ValueError(f'num_heads per block needs attention blocks; token_mixer '
                     f'is {vit.token_mixer!r}')
  if vit.scan_layers:
    raise ValueError(
        f'num_heads per block {tuple(heads)} cannot run with scan_layers=True: '
        'one nn.scan needs blocks of the same shapes; set scan_layers=False')
  if head_dim is None:
    raise ValueError(
        f'num_heads per block {tuple(heads)} needs head_dim (the width of one '
        'head): with heads dropped, hidden_size // num_heads no longer gives it')


def block_fields(fields: Mapping[str, Any], index: int) -> dict[str, Any]:
  """The fields of encoder block `index`: its own head count."""
  if is_per_block(fields.get('num_heads')):
    return dict(fields, num_heads=int(fields['num_heads'][index]))
  return dict(fields)


def pooling_heads(vit: Any) -> int:
  """Heads of the MAP head: its attention keeps all of the model's heads
  (hidden_size // head_dim of them when head_dim is given)."""
  head_dim = getattr(vit, 'head_dim', None)
  return vit.hidden_size // head_dim if head_dim else vit.num_heads


def heads_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """`num_heads` and `head_dim` read off a params tree's query kernels.

  Empty unless they differ from a plain model's (the same count in every
  block, heads * head_dim = hidden): a file in which no heads were dropped
  leaves the registered variant as it is. A scanned layout (one stacked
  `encoderblock`) has one count for every block.
  """
  encoder = params.get('Transformer', {})
  shapes = []
  if 'encoderblock' in encoder:
    kernel = encoder['encoderblock'].get(_ATTENTION, {}).get('query', {}).get('kernel')
    shapes = [] if kernel is None else [tuple(kernel.shape[1:])]
  i = 0
  while f'encoderblock_{i}' in encoder:
    kernel = encoder[f'encoderblock_{i}'].get(_ATTENTION, {}).get(
        'query', {}).get('kernel')
    if kernel is None:
      return {}
    shapes.append(tuple(kernel.shape))
    i += 1
  if not shapes:
    return {}
  counts = tuple(int(s[1]) for s in shapes)
  hidden, head_dim = shapes[0][0], int(shapes[0][2])
  if len(set(counts)) == 1 and counts[0] * head_dim == hidden:
    return {}
  return dict(num_heads=counts[0] if len(set(counts)) == 1 else counts,
              head_dim=head_dim)
