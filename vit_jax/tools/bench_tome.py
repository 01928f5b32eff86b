"""Token merging in `vit_jax.tools.benchmark`: one model per `--tome_r` value.

The first value's model is the tool's usual run ('jax'); each later value R
is another compiled step named 'tome_r=R', timed in the same interleaved
rounds, so its `speedup` (the median per-round ratio of the first model's
step time over its own) is not skewed by a shared machine's drift.
"""

import copy
from typing import Any

import ml_collections

from vit_jax import models


def parse_flag(values: list[str], *, compare: str, pipeline: bool) -> list[int]:
  """The --tome_r values as ints; raises ValueError for what cannot be timed."""
  if not values or not all(v.isdigit() for v in values) or len(set(values)) < len(
      values):
    raise ValueError(f'--tome_r must be distinct integers >= 0, got {values}.')
  if (compare or pipeline) and values != ['0']:
    raise ValueError('--tome_r: timm has no token merging, and --pipeline '
                     'times one step; drop one of them.')
  return [int(v) for v in values]


def variants(fields: ml_collections.ConfigDict, values: list[str] | None,
             image_size: int) -> dict[str, ml_collections.ConfigDict]:
  """{'jax': fields at the first --tome_r value, 'tome_r=R': fields at each
  later R}, each checked (a ViT, a token count that can merge R) before
  anything compiles. values None (flag unset): the fields' own tome_r."""
  tome_rs = ([fields.get('tome_r', 0)] if values is None
             else [int(v) for v in values])
  out = {}
  for i, r in enumerate(tome_rs):
    if r and 'tome_r' not in fields:
      raise ValueError(f'--tome_r={r}: {fields.name} has no attention tokens '
                       'to merge (token merging needs a ViT).')
    variant = copy.deepcopy(fields)
    if 'tome_r' in fields:
      variant.tome_r = r
      models.create_model(variant, 1)
      models.check_image_size(variant, image_size)
    out['jax' if i == 0 else f'tome_r={r}'] = variant
  return out


def format_lines(result: dict[str, Any]) -> list[str]:
  """One line per later --tome_r value."""
  return [f"  {name}: {r['img_per_sec']:.1f} img/s, {r['step_ms']:.1f} ms/step, "
          f"{r['speedup']:.2f}x the img/s of tome_r={result['tome_r']} (median "
          f"of {len(r['img_per_sec_runs'])} interleaved rounds)"
          for name, r in result.items() if name.startswith('tome_r=')]
