"""A workdir's params as a released-layout `.npz` (and optionally safetensors).

    python -m vit_jax.tools.export --workdir=runs/quickstart --out=model.npz
    python -m vit_jax.tools.export --workdir=runs/b16 --step=20000 \\
        --out=b16.npz --safetensors=b16.safetensors

The `.npz` is what Google released for ViT (`np.savez` of '/'-joined names
such as `Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`), written by
`checkpoint.save_npz`: it loads with `checkpoint.load_npz`, as a fine-tuning
start (`--config.pretrained_path`), in the other tools (`--checkpoint` with
`--model` and `--image_size`) and in loaders of the released files (timm).
The safetensors file holds the same names and arrays, for frameworks that
prefer it; it needs the `safetensors` package.
"""

import sys
from typing import Any

from absl import flags
from etils import epath
import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoint import layouts
from vit_jax.tools import cli


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # Only a config_flags flag reads it.
  flags.DEFINE_string('workdir', None, 'A train.py workdir.', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                       flag_values=fv)
  flags.DEFINE_string('out', None, '.npz file to write.', flag_values=fv)
  flags.DEFINE_string('safetensors', None, 'Also write a .safetensors file '
                      'with the same names.', flag_values=fv)


def save_safetensors(path: str, params: dict[str, Any]) -> None:
  """Writes `params` under their released names, atomically (tmp + rename)."""
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('--safetensors needs the safetensors package: '
                      '`pip install safetensors`.') from e
  flat = {name: np.ascontiguousarray(value) for name, value in
          layouts.flatten_params(params).items()}
  blob = st_numpy.save(flat, metadata={'layout': 'vit released npz names'})
  target = epath.Path(path)
  tmp = target.parent / f'.{target.name}.tmp'
  tmp.write_bytes(blob)
  tmp.replace(target)


def export(workdir: str, out: str, *, step: int | None = None,
           safetensors_path: str | None = None) -> dict[str, Any]:
  """Writes the params of `workdir` (latest or `step`); returns them (numpy)."""
  params = checkpoint.load_params(workdir, step)
  checkpoint.save_npz(out, params)
  if safetensors_path:
    save_safetensors(safetensors_path, params)
  return params


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise ValueError(f'unexpected arguments {args}')
  if not fv.workdir or not fv.out:
    raise ValueError('--workdir and --out are required')
  params = export(fv.workdir, fv.out, step=fv.step,
                  safetensors_path=fv.safetensors)
  arrays = layouts.flatten_params(params)
  size = sum(a.nbytes for a in arrays.values())
  print(f'wrote {fv.out}: {len(arrays)} arrays, {size / 2**20:.1f} MiB'
        + (f'; and {fv.safetensors}' if fv.safetensors else ''))


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
