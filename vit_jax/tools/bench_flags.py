"""The flags of vit_jax.tools.benchmark and their checks (benchmark.py's
docstring says what each mode times)."""

import os

from absl import flags
from ml_collections import config_flags

from vit_jax.models.precision import POLICIES
from vit_jax.tools import bench_mixers
from vit_jax.tools import bench_quantized
from vit_jax.tools import bench_tome

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ('train', 'infer')
# Peers: timm eager, and timm's model under torch.compile (inductor).
COMPARE = ('timm', 'timm_compile')


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
      'config', os.path.join(ROOT, 'configs', 'quickstart.py'),
      'Training config: optimizer and loss of the train step, the model of '
      '--model=quickstart, the input of --pipeline.', flag_values=fv,
      lock_config=True, sys_argv=argv)
  flags.DEFINE_string('model', 'quickstart', "Registered name (ViT-S_16) or "
                      "'quickstart'/'config' (--config's model).", flag_values=fv)
  flags.DEFINE_integer('batch', 16, 'Global batch (--pipeline: default the '
                       "config's batch_size).", flag_values=fv)
  flags.DEFINE_enum('mode', 'train', MODES, 'Step to time.', flag_values=fv)
  flags.DEFINE_integer('image_size', 224, "Input size (--config's for "
                       'quickstart/--pipeline).', flag_values=fv)
  flags.DEFINE_integer('channels', 3, 'Input channels (likewise).',
                       flag_values=fv)
  flags.DEFINE_integer('num_classes', 1000, 'Head size (quickstart: 10; '
                       "--pipeline: the dataset's).", flag_values=fv)
  flags.DEFINE_enum('precision', 'float32', POLICIES, 'Precision policy '
                    '(vit_jax/models/precision.py); timm runs under '
                    'torch.autocast(bfloat16) for mixed_bf16 and bfloat16.',
                    flag_values=fv)
  flags.DEFINE_string('dtype', None, 'Replaced by --precision.', flag_values=fv)
  flags.DEFINE_integer('steps', 3, 'Steps per timed run.', flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'Timed runs (rounds); the median is '
                       'reported.', flag_values=fv)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps first.', flag_values=fv)
  flags.DEFINE_list('compare', [], 'Also time these peers, interleaved: timm '
                    '(eager), timm_compile (torch.compile), or both.',
                    flag_values=fv)
  flags.DEFINE_bool('pipeline', False, "Time --config's input pipeline "
                    'against the train step.', flag_values=fv)
  flags.DEFINE_integer('pipeline_jpegs', 0, 'With --pipeline: read N '
                       'generated JPEGs from a temporary image folder.',
                       flag_values=fv)
  flags.DEFINE_string('json', None, 'Also write the results to this file.',
                      flag_values=fv)
  flags.DEFINE_list('tome_r', '0', 'Token merging: tokens merged per block '
                    '(model.tome_r); several time a model each, interleaved.',
                    flag_values=fv)
  flags.DEFINE_bool('profile_dots', False, 'After timing, profile our step: '
                    'each matrix product in the step against itself alone, '
                    'and the glue by kind (bench_dots.py).', flag_values=fv)
  # The token-mixer sweep of vit_jax/tools/bench_mixers.py (its docstring).
  flags.DEFINE_string('quantized', None, 'An int8 file (tools.quantize): time '
                      'its model in int8 and in float32, interleaved '
                      '(inference).', flag_values=fv)
  flags.DEFINE_enum('sweep', '', ('', 'mixers'), "'mixers': sweep the token "
                    'mixers instead of timing one step; reads --precision, '
                    '--num_classes and --config (train optimizer) too.',
                    flag_values=fv)
  flags.DEFINE_string('sweep_json', None, 'Write the sweep here (rewritten '
                      'after every point).', flag_values=fv)
  flags.DEFINE_string('sweep_plot', None, 'Write its plot (PNG) here.',
                      flag_values=fv)
  flags.DEFINE_list('sweep_tokens', '64,256,576,1024,2304,4096', 'Token counts '
                    'of the one-block points, squares (empty: none).',
                    flag_values=fv)
  flags.DEFINE_list('sweep_sizes', '224,448,672,896', 'Image sizes of the '
                    'full-model points (empty: none).', flag_values=fv)
  flags.DEFINE_list('sweep_mixers', ','.join(bench_mixers.MIXERS), 'Mixers to '
                    'time; the crossing table needs softmax.', flag_values=fv)
  flags.DEFINE_integer('sweep_batch', 4, 'Batch of the one-block points.',
                       flag_values=fv)
  flags.DEFINE_integer('sweep_model_batch', 2, 'Batch of the full-model '
                       'points.', flag_values=fv)
  flags.DEFINE_integer('sweep_steps', 1, 'Fewest steps per timed run (more '
                       'to fill 0.1 s).', flag_values=fv)
  flags.DEFINE_integer('sweep_repeats', 3, 'Timed runs per point; the median '
                       'is reported.', flag_values=fv)
  flags.DEFINE_integer('sweep_timeout', 900, 'Seconds a point may take, '
                       'compile included, before it counts as failed.',
                       flag_values=fv)
  flags.DEFINE_enum('sweep_family', 'Ti', tuple(bench_mixers.FAMILIES),
                    "Shapes: 'Ti', or 'test' (tiny, for the tool's tests).",
                    flag_values=fv)
  flags.DEFINE_bool('sweep_in_process', False, 'Run the points in this '
                    'process (tests, debugging): peak memory is then the '
                    'maximum so far, not per point.', flag_values=fv)


def check_flags(fv: flags.FlagValues) -> None:
  """Rejects values that cannot be timed, before anything is built."""
  for name, low in (('batch', 1), ('steps', 1), ('repeats', 1), ('warmup', 0),
                    ('image_size', 1), ('channels', 1), ('num_classes', 1),
                    ('pipeline_jpegs', 0)):
    if fv[name].value < low:
      raise ValueError(f'--{name} must be >= {low}, got {fv[name].value}.')
  if fv.dtype is not None:
    raise ValueError(f'--dtype was replaced by --precision (one of '
                     f'{", ".join(POLICIES)}; --dtype=bfloat16 is now '
                     '--precision=bfloat16, and --precision=mixed_bf16 runs the '
                     'products in bf16 and the rest in float32).')
  unknown = sorted(set(fv.compare) - set(COMPARE))
  if unknown:
    raise ValueError(f'--compare: unknown peer(s) {unknown}; choose from '
                     f'{", ".join(COMPARE)}.')
  if fv.pipeline_jpegs and not fv.pipeline:
    raise ValueError('--pipeline_jpegs needs --pipeline.')
  if fv.pipeline and fv.compare:
    raise ValueError('--pipeline times our input against our step; run '
                     '--compare without it.')
  bench_tome.parse_flag(fv.tome_r, compare=fv.compare, pipeline=fv.pipeline)
  bench_quantized.check_flags(fv)
  if fv.profile_dots and fv.sweep:
    raise ValueError('--profile_dots profiles one step; the sweep times many '
                     'in their own processes: drop one of them.')
  if fv.pipeline and fv.mode != 'train':
    raise ValueError('--pipeline compares the input with the train step; '
                     'drop --mode=infer.')
