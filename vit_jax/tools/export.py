"""A model's params as a released-layout `.npz` (and optionally safetensors),
or as a Hugging Face `transformers` ViT directory.

    python -m vit_jax.tools.export --workdir=runs/quickstart --out=model.npz
    python -m vit_jax.tools.export --workdir=runs/b16 --step=20000 \\
        --out=b16.npz --safetensors=b16.safetensors
    python -m vit_jax.tools.export --format=hf --workdir=runs/quickstart \\
        --out=hf_quickstart
    python -m vit_jax.tools.export --format=hf --checkpoint=ViT-B_16.npz \\
        --model=ViT-B_16 --image_size=224 --class_names=names.txt --out=hf_b16

The model comes from a workdir or, as in the other tools, from a
`--checkpoint` file with `--model` and `--image_size` (any layout load_npz
reads, so a released, Linen or big_vision file converts directly).

The `.npz` is what Google released for ViT (`np.savez` of '/'-joined names
such as `Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`), written by
`checkpoint.save_npz`: it loads with `checkpoint.load_npz`, as a fine-tuning
start (`--config.pretrained_path`), in the other tools (`--checkpoint` with
`--model` and `--image_size`) and in loaders of the released files (timm).
The safetensors file holds the same names and arrays, for frameworks that
prefer it; it needs the `safetensors` package.

`--format=hf` writes the directory `--out` (new, or empty) with config.json,
model.safetensors and preprocessor_config.json, which
`transformers.ViTForImageClassification.from_pretrained` loads and which
computes this model's logits (vit_jax.checkpoint.hf). Models HF's ViT cannot
compute are refused with the reason, before anything is written: pooling
other than the cls token, a pre_logits layer, conv or ResNet stems, Fourier
or FAVOR+ token mixing, ToMe, per-block head counts. A fixed sincos2d
position embedding is written as the table it is (HF keeps it learnable).

A run with `config.pruning` wrote weights that are already exactly zero where
pruned; the tool prints the real sparsity of each pruned kernel (per encoder
block). `--drop_pruned_heads` removes the heads whose query/key/value kernel
and bias slices and `out` kernel slice are all zero (head pruning), for good:
the file's blocks then have their own head counts, which the tools read off
the query kernels' shapes (vit_jax.models.head_counts), e.g.

    python -m vit_jax.tools.export --workdir=runs/heads --out=small.npz \\
        --drop_pruned_heads
    python -m vit_jax.tools.predict --checkpoint=small.npz --model=ViT-B_16 \\
        --image_size=224 image.jpg
"""

import json
import re
import sys
from typing import Any, Mapping

from absl import flags
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import pruning
from vit_jax.checkpoint import hf
from vit_jax.checkpoint import hf_config
from vit_jax.checkpoint import layouts
from vit_jax.checkpoint import quantized
from vit_jax.checkpoint import safetensors_file
from vit_jax.checkpoint import workdir_reader
from vit_jax.models.vit import posemb_sincos_2d
from vit_jax.tools import cli

# Per-head slices of an attention module: (projection, param, heads axis).
_HEAD_SLICES = (('query', 'kernel', 1), ('query', 'bias', 0),
                ('key', 'kernel', 1), ('key', 'bias', 0),
                ('value', 'kernel', 1), ('value', 'bias', 0),
                ('out', 'kernel', 0))
_SCANNED = 'Transformer/encoderblock/'
FORMATS = ('npz', 'hf')
_BLOCK = re.compile(r'Transformer/encoderblock_(\d+)/')


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # Only a config_flags flag reads it.
  cli.define_model_flags(fv)
  flags.DEFINE_enum('format', 'npz', FORMATS, 'npz: the released layout; hf: '
                    'a Hugging Face transformers ViT directory.',
                    flag_values=fv)
  flags.DEFINE_string('out', None, '.npz file to write (--format=hf: a new '
                      'or empty directory).', flag_values=fv)
  flags.DEFINE_string('safetensors', None, 'Also write a .safetensors file '
                      'with the same names.', flag_values=fv)
  flags.DEFINE_bool('drop_pruned_heads', False, 'Remove the attention heads '
                    'that are all zero (config.pruning.method=heads): a '
                    'smaller model, one head count per block.', flag_values=fv)


def save_safetensors(path: str, params: dict[str, Any]) -> None:
  """Writes `params` under their released names, atomically (tmp + rename)."""
  try:
    import safetensors  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError('--safetensors needs the safetensors package: '
                      '`pip install safetensors`.') from e
  safetensors_file.write_arrays(
      path, layouts.flatten_params(params),
      metadata={'layout': 'vit released npz names'})


def zero_heads(attention: Mapping[str, Any]) -> np.ndarray:
  """bool [heads]: the heads of one attention module's params whose slices
  (`_HEAD_SLICES`) are all exactly zero."""
  zero = True
  for projection, name, axis in _HEAD_SLICES:
    x = np.asarray(attention[projection][name])
    zero = zero & np.all(x == 0, axis=tuple(a for a in range(x.ndim) if a != axis))
  return zero


def drop_pruned_heads(params: Mapping[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
  """`params` (per-block layout) without the all-zero heads of each encoder
  block, and per block (heads kept, heads it had).

  Raises:
    ValueError: no attention encoder blocks, or a block whose heads are all zero.
  """
  params = layouts.unstack_encoder_blocks(params)  # Fresh dicts: edited below.
  encoder = params.get('Transformer', {})
  blocks = [k for k in encoder if k.startswith('encoderblock_')
            and 'MultiHeadDotProductAttention_1' in encoder[k]]
  if not blocks:
    raise ValueError('--drop_pruned_heads needs attention encoder blocks '
                     '(Transformer/encoderblock_i/MultiHeadDotProductAttention_1)')
  kept = {}
  for block in sorted(blocks, key=lambda k: int(k.split('_')[-1])):
    attention = encoder[block]['MultiHeadDotProductAttention_1']
    keep = ~zero_heads(attention)
    if not keep.any():
      raise ValueError(f'every head of Transformer/{block} is zero; a block '
                       'needs at least one head')
    for projection, name, axis in _HEAD_SLICES:
      attention[projection][name] = np.compress(
          keep, attention[projection][name], axis=axis)
    kept[f'Transformer/{block}'] = (int(keep.sum()), int(keep.size))
  return params, kept


def saved_pruning(workdir: str, step: int | None = None
                  ) -> ml_collections.ConfigDict | None:
  """The run's `config.pruning`, or None (no pruning, or saved before it)."""
  config = json.loads(workdir_reader.load_meta(workdir, step).get('config', '{}'))
  section = config.get('pruning')
  if not section or section.get('method', 'none') == 'none':
    return None
  return ml_collections.ConfigDict(section)


def _block_order(name: str) -> tuple[int, str]:
  """Block by block (block 10 after block 9), other params first."""
  match = _BLOCK.match(name)
  return (int(match.group(1)) if match else -1, name)


def sparsity_report(params: Mapping[str, Any],
                    pruning_config: ml_collections.ConfigDict) -> list[str]:
  """Lines: the fraction of exact zeros of each parameter the run pruned
  (a scanned one per block), and over all of them."""
  flat = layouts.flatten_params(params)
  rows = []
  for name in pruning.pruned_names(params, pruning_config):
    if name.startswith(_SCANNED):  # [num_layers, ...]: one row per block.
      rows += [(name.replace(_SCANNED, f'Transformer/encoderblock_{i}/'), layer)
               for i, layer in enumerate(flat[name])]
    else:
      rows.append((name, flat[name]))
  rows.sort(key=lambda row: _block_order(row[0]))
  lines = [f'pruning {pruning_config.method!r} (target sparsity '
           f'{pruning_config.sparsity}): exact zeros per pruned parameter']
  lines += [f'  {name} {tuple(x.shape)}: {np.mean(x == 0):.4f}' for name, x in rows]
  zeros, size = sum(int(np.sum(x == 0)) for _, x in rows), sum(x.size for _, x in rows)
  lines.append(f'  all {len(rows)}: {zeros / max(size, 1):.4f} '
               f'({zeros:,} of {size:,} weights)')
  return lines


def export(workdir: str, out: str, *, step: int | None = None,
           safetensors_path: str | None = None, drop_heads: bool = False
           ) -> tuple[dict[str, Any], list[str]]:
  """Writes the params of `workdir` (latest or `step`) as a released `.npz`.

  Returns the params written (numpy) and lines to print: the real sparsity
  when the run pruned (`sparsity_report`), the heads kept with `drop_heads`
  (then the params lack their all-zero heads, `drop_pruned_heads`).
  """
  params = checkpoint.load_params(workdir, step)
  pruned = saved_pruning(workdir, step)
  lines = sparsity_report(params, pruned) if pruned is not None else []
  return write_npz(params, out, lines, safetensors_path=safetensors_path,
                   drop_heads=drop_heads)


def write_npz(params: dict[str, Any], out: str, lines: list[str] | None = None,
              *, safetensors_path: str | None = None, drop_heads: bool = False
              ) -> tuple[dict[str, Any], list[str]]:
  """`export`'s writing half, for params from any source."""
  lines = list(lines or [])
  if drop_heads:
    params, kept = drop_pruned_heads(params)
    lines.append('heads kept (of the block\'s): ' + ', '.join(
        f'{block} {k}/{n}' for block, (k, n) in kept.items()))
  checkpoint.save_npz(out, params)
  if safetensors_path:
    save_safetensors(safetensors_path, params)
  return params, lines


def export_hf(trained: Any, out: str) -> dict[str, np.ndarray]:
  """Writes `trained` (a tools.loading.TrainedModel) as the Hugging Face ViT
  directory `out`; returns the state dict written.

  A sincos2d model's fixed position embedding is materialised: HF's ViT has
  only a learned table, which then starts from those values.
  """
  hf.check_out_dir(out)
  hf.check_exportable(trained.model)
  params = trained.params
  if trained.model.posemb == 'sincos2d':
    ph, pw = trained.model.patch_size
    table = posemb_sincos_2d(trained.image_size // ph, trained.image_size // pw,
                             trained.model.hidden_size)
    flat = layouts.flatten_params(params)
    flat[layouts.POSEMB_KEY] = np.pad(table, ((0, 0), (1, 0), (0, 0)))
    params = layouts.unflatten_params(flat)  # The cls token adds no posemb.
  return hf.save_hf_dir(out, params, model=trained.model,
                        image_size=trained.image_size,
                        channels=trained.channels,
                        class_names=trained.class_names)


def _float_model(fv: flags.FlagValues) -> Any:
  """The model --workdir or --checkpoint names; an int8 file is refused."""
  if fv.checkpoint and quantized.is_quantized(fv.checkpoint):
    raise ValueError(f'{fv.checkpoint} is an int8 model (vit_jax.tools.'
                     'quantize); export the float checkpoint it came from')
  return cli.load_model(fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise ValueError(f'unexpected arguments {args}')
  if not fv.out or not (fv.workdir or fv.checkpoint):
    raise ValueError('--out and --workdir (or --checkpoint with --model and '
                     '--image_size) are required')
  cli.check_output_path(fv.out, 'out')  # Before loading anything.
  if fv.safetensors:
    cli.check_output_path(fv.safetensors, 'safetensors')
  if fv.format == 'hf':
    if fv.safetensors or fv.drop_pruned_heads:
      raise ValueError('--safetensors and --drop_pruned_heads are for '
                       '--format=npz (an HF ViT has one head count for all '
                       'layers; its directory holds model.safetensors)')
    hf.check_out_dir(fv.out)  # Before loading anything.
    state = export_hf(_float_model(fv), fv.out)
    size = sum(a.nbytes for a in state.values())
    print(f'wrote {fv.out}: {hf_config.CONFIG_FILE}, {hf.WEIGHTS_FILE} ({len(state)} '
          f'tensors, {size / 2**20:.1f} MiB), {hf_config.PREPROCESSOR_FILE}')
    return
  if fv.checkpoint:
    params, lines = write_npz(
        _float_model(fv).params, fv.out, safetensors_path=fv.safetensors,
        drop_heads=fv.drop_pruned_heads)
  else:
    params, lines = export(fv.workdir, fv.out, step=fv.step,
                           safetensors_path=fv.safetensors,
                           drop_heads=fv.drop_pruned_heads)
  for line in lines:
    print(line)
  arrays = layouts.flatten_params(params)
  size = sum(a.nbytes for a in arrays.values())
  print(f'wrote {fv.out}: {len(arrays)} arrays, {size / 2**20:.1f} MiB'
        + (f'; and {fv.safetensors}' if fv.safetensors else ''))


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
