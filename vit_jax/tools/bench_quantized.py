"""int8 files in `vit_jax.tools.benchmark`: `--quantized=F.npz`.

The file (vit_jax.tools.quantize) names its model, input and classes, so the
tool times that model twice in the same interleaved rounds: in float32
('jax', the usual run, on freshly initialised params of the same shapes;
the values do not change the cost) and as the int8 model on the file's own
params ('int8'). `int8.speedup` is the median per-round ratio of the float
step time over the int8 one. The file's size and that of the same model's
float export are reported beside it.
"""

import os
import sys
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import flops
from vit_jax import models
from vit_jax import parallel
from vit_jax.checkpoint import quantized
from vit_jax.tools import bench_timing

NAME = 'int8'


def check_flags(fv: flags.FlagValues) -> None:
  """Refuses what an int8 file cannot be timed with, before anything loads."""
  if not fv.quantized:
    return
  clashes = [f'--{name}' for name in ('model', 'image_size', 'channels',
                                      'num_classes', 'tome_r', 'compare',
                                      'pipeline', 'sweep')
             if fv[name].present]
  if clashes:
    raise ValueError(f'--quantized: the file names its model, input and '
                     f'classes and is timed against float32 alone; drop '
                     f'{", ".join(clashes)}.')
  if fv.mode != 'infer' and fv['mode'].present:
    raise ValueError('--quantized times inference (an int8 file has no '
                     'optimizer state to train); drop --mode.')
  if fv.precision != 'float32':
    raise ValueError('--quantized compares with the float32 model; drop '
                     '--precision.')
  if not os.path.isfile(fv.quantized):
    raise ValueError(f'--quantized: no file {fv.quantized}')
  if not quantized.is_quantized(fv.quantized):
    raise ValueError(f'--quantized: {fv.quantized} is not an int8 file of '
                     'vit_jax.tools.quantize (a float checkpoint? time it '
                     'with --model and --image_size).')


def float_model(path: str) -> tuple[ml_collections.ConfigDict,
                                    tuple[int, int, int], int]:
  """(the file's model section, (size, size, channels), classes)."""
  meta = quantized.read_metadata(path)
  size, channels = int(meta['image_size']), int(meta['channels'])
  return (ml_collections.ConfigDict(meta['model']), (size, size, channels),
          len(meta['class_names']))


def build_int8_step(config: ml_collections.ConfigDict, path: str, batch: int
                    ) -> tuple[bench_timing.Run, dict[str, Any]]:
  """The int8 forward of the file, jitted on the mesh as the float one is;
  run(n) and its facts (compile_s, flops_per_step, file and float sizes)."""
  # Here: loading reaches the (TensorFlow) preprocessing, which timing a float
  # model without --quantized must not need.
  from vit_jax.tools import loading  # pylint: disable=g-import-not-at-top
  trained = loading.load_quantized(path)
  shape = (trained.image_size, trained.image_size, trained.channels)
  mesh = parallel.make_mesh(data=config.mesh.data, model=config.mesh.model)
  parallel.check_batch_size(batch, mesh, 1)
  data = bench_timing.random_batch(batch, shape, trained.num_classes, mesh)
  params = jax.device_put(trained.params, parallel.replicated(mesh))
  start = time.perf_counter()
  lowered, _, run = bench_timing.compile_forward(trained.model, params, data, mesh)
  compile_s = time.perf_counter() - start
  print(f'compiled the int8 infer step in {compile_s:.1f}s', file=sys.stderr,
        flush=True)

  float_shapes = jax.eval_shape(lambda: models.create_model(
      trained.model_config, trained.num_classes).init(
          jax.random.key(0), jnp.zeros((1,) + shape), train=False))['params']
  float_size = quantized.float_export_bytes(  # An npz's size ignores values.
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), float_shapes))
  return run, {'compile_s': compile_s, 'flops_per_step': flops.step_flops(lowered),
               'file_bytes': os.path.getsize(path), 'float_export_bytes': float_size}


def format_lines(result: dict[str, Any]) -> list[str]:
  """The int8 model's line, if it was timed."""
  r = result.get(NAME)
  if r is None:
    return []
  return [f"  int8: {r['img_per_sec']:.1f} img/s, {r['step_ms']:.1f} ms/step, "
          f"{r['speedup']:.2f}x the float32 img/s (median of "
          f"{len(r['img_per_sec_runs'])} interleaved rounds); file "
          f"{r['file_bytes'] / 1e6:.3f} MB = "
          f"{r['file_bytes'] / r['float_export_bytes']:.2f}x the float export"]
