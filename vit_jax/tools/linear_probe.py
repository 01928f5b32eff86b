"""Few-shot (and full) linear probes of a checkpoint's features, cached on disk.

    python -m vit_jax.tools.linear_probe --workdir=runs/quickstart --dataset=digits
    python -m vit_jax.tools.linear_probe --checkpoint=ViT-B_16.npz \\
        --model=ViT-B_16 --image_size=224 --dataset=cifar10 \\
        --train_split='train[:10000]' --shots=1,5,10,25 --l2_reg=256,1024,4096 --full

The pre-logit features of the train and test split are computed once and cached
(vit_jax.feature_cache) under the workdir's `feature_cache/` (beside a
`--checkpoint` file, or in `--cache_dir`), keyed by the checkpoint's digest,
the dataset, split, preprocessing and model; a rerun that changes only the
shots, seeds or l2 values reuses them, which a line per split says
(`features: computed ...` / `features: reused ...`). A cache file that is
damaged or was made under another key is rebuilt with a warning. The fits are
vit_jax.fewshot's (the same as `config.fewshot` during training): for each
shot count and seed, ridge regression on `shots` examples per class; with
`--full`, on the whole train split. Prints a table (and `--json_out`).
"""

import json
import sys
from typing import Any

from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections

from configs import common
from vit_jax import feature_cache
from vit_jax import fewshot
from vit_jax import parallel
from vit_jax.checkpoint import quantized
from vit_jax.checkpoint import workdir_reader
from vit_jax.tools import cli

CACHE_DIR = 'feature_cache'


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  cli.define_model_flags(fv)
  flags.DEFINE_string('dataset', None, "A TFDS name, 'fashion_mnist', 'digits' "
                      "or 'folder:/path'.", flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'TFDS data directory.', flag_values=fv)
  flags.DEFINE_string('train_split', 'train', 'Split the shots (and --full) '
                      'are fit on; all of it is embedded.', flag_values=fv)
  flags.DEFINE_string('test_split', 'test', 'Split the probes are scored on.',
                      flag_values=fv)
  flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'Examples per class.',
                    flag_values=fv)
  flags.DEFINE_integer('seeds', 3, 'Draws of the shots per count (mean).',
                       flag_values=fv)
  flags.DEFINE_list('l2_reg', [str(2.0**10)], 'Ridge penalties to try.',
                    flag_values=fv)
  flags.DEFINE_bool('full', False, 'Also fit on the whole train split.',
                    flag_values=fv)
  flags.DEFINE_string('cache_dir', None, 'Where features are cached (default: '
                      f'WORKDIR/{CACHE_DIR}, or beside --checkpoint).',
                      flag_values=fv)
  flags.DEFINE_integer('batch_size', 256, 'Batch size of the feature pass.',
                       flag_values=fv)
  flags.DEFINE_string('json_out', None, 'Also write the results as JSON.',
                      flag_values=fv)


def probe_config(trained: Any, dataset: str, data_dir: str | None,
                 splits: tuple[str, str], shots: tuple[int, ...],
                 batch_size: int) -> ml_collections.ConfigDict:
  """A training config reading `dataset` as the model's eval would see it."""
  config = common.get_config()
  config.dataset = dataset
  config.input.data_dir = data_dir
  config.input.image_size, config.input.channels = trained.image_size, trained.channels
  config.pp.eval_crop_fraction = trained.pp.eval_crop_fraction
  config.eval.batch_size = batch_size
  config.fewshot.datasets = dataset
  config.fewshot.train_split, config.fewshot.test_split = splits
  config.fewshot.shots = shots
  return config


def checkpoint_digest(fv: flags.FlagValues) -> str:
  """What identifies the params: a workdir checkpoint's saved digest, or the
  bytes of a --checkpoint file (or directory)."""
  if fv.workdir:
    meta = workdir_reader.load_meta(fv.workdir, fv.step)
    return json.dumps(meta['digest'], sort_keys=True)
  return feature_cache.file_digest(fv.checkpoint)


def cache_key(digest: str, trained: Any, dataset: str, split: str
              ) -> dict[str, Any]:
  """Everything the features of `split` depend on."""
  return dict(checkpoint=digest, dataset=dataset, split=split,
              image_size=trained.image_size, channels=trained.channels,
              eval_crop_fraction=trained.pp.eval_crop_fraction,
              model=trained.model_config.to_json_best_effort(sort_keys=True))


def cached_features(compute: Any, key: dict[str, Any], cache_dir: str):
  """(features, labels) from the cache under `key`, else `compute()` (stored)."""
  path = feature_cache.cache_path(cache_dir, key)
  try:
    features, labels = feature_cache.load(path, key)
    print(f'features: reused {key["split"]} ({len(labels)} examples, '
          f'{features.shape[1]} dims) from {path}')
    return features, labels
  except FileNotFoundError:
    pass
  except feature_cache.CacheMismatch as e:
    logging.warning('Rebuilding the feature cache: %s', e)
    print(f'warning: rebuilding the feature cache: {e}', file=sys.stderr)
  features, labels = compute()
  feature_cache.save(path, key, features, labels)
  print(f'features: computed {key["split"]} ({len(labels)} examples, '
        f'{features.shape[1]} dims) -> {path}')
  return features, labels


def run_probe(fv: flags.FlagValues) -> list[dict[str, Any]]:
  """Checks everything, then probes; one row per (probe, l2): `probe` ('5-shot'
  or 'full'), `shots` (None for full), `l2_reg`, `top1`."""
  if not fv.dataset:
    raise ValueError('--dataset is required (e.g. --dataset=digits)')
  if fv.checkpoint and quantized.is_quantized(fv.checkpoint):
    raise ValueError(f'{fv.checkpoint} is an int8 file; probe the float '
                     'checkpoint it was made from.')
  shots = tuple(sorted({int(s) for s in fv.shots}))
  l2_regs = tuple(float(x) for x in fv.l2_reg)
  trained = cli.load_model(fv)
  config = probe_config(trained, fv.dataset, fv.data_dir,
                        (fv.train_split, fv.test_split), shots, fv.batch_size)
  fewshot.check_config(config)
  (task,) = fewshot.prepare(config, shots=shots or (1,))  # Before compiling.
  mesh = parallel.make_mesh()
  parallel.check_batch_size(fv.batch_size, mesh)
  replicated = parallel.replicated(mesh)
  params = jax.device_put(fewshot.backbone(trained.params), replicated)
  step = fewshot.jit_features_step(fewshot.features_model(trained.model_config),
                                   mesh, replicated)
  cache_dir = fv.cache_dir or str(
      (epath.Path(fv.checkpoint).absolute().parent if fv.checkpoint
       else epath.Path(fv.workdir)) / CACHE_DIR)
  digest = checkpoint_digest(fv)
  train, test = (cached_features(
      lambda split=split: fewshot.compute_features(
          step, params, task.config, split, mesh, fv.batch_size),
      cache_key(digest, trained, fv.dataset, split), cache_dir)
                 for split in (fv.train_split, fv.test_split))
  rows = [dict(probe=f'{n}-shot', shots=n, l2_reg=l2, top1=top1)
          for (n, l2), top1 in fewshot.fewshot_top1(
              train, test, num_classes=task.num_classes, shots=shots,
              seeds=fv.seeds, l2_regs=l2_regs).items()]
  if fv.full:
    rows += [dict(probe='full', shots=None, l2_reg=l2, top1=top1)
             for l2, top1 in zip(l2_regs, fewshot.ridge_top1(
                 train, test, task.num_classes, l2_regs))]
  return rows


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise ValueError(f'unexpected arguments {args}')
  if fv.json_out:
    cli.check_output_path(fv.json_out, 'json_out')
  rows = run_probe(fv)
  print(f'{fv.dataset} {fv.train_split} -> {fv.test_split} '
        f'({fv.seeds} seeds per shot count)')
  print(f'{"probe":>8} {"l2_reg":>10} {"top1":>7}')
  for row in rows:
    print(f'{row["probe"]:>8} {row["l2_reg"]:>10g} {row["top1"]:7.4f}')
  if fv.json_out:
    with open(fv.json_out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
