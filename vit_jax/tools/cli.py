"""Command-line plumbing shared by the tools: flags, model loading, errors.

Each tool defines its flags on its own `absl.flags.FlagValues` (not the global
FLAGS), so the tools can be imported side by side and run in-process by tests.
A user error (missing file, undecodable image, wrong model) ends the tool with
`error: <message>` and exit code 1, without a traceback; a bad flag with a usage
line and exit code 2 (vit_jax.refusals, shared with train.py; `--verbose`
brings the traceback back).
"""

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from absl import flags

from vit_jax import refusals
from vit_jax import startup

if TYPE_CHECKING:
  from vit_jax.tools import loading

Main = Callable[[flags.FlagValues, list[str]], None]
# Defines a tool's flags; gets argv because config_flags reads overrides from it.
Define = Callable[[flags.FlagValues, list[str]], None]


class StepParser(flags.ArgumentParser):
  """--step: a checkpoint step (an integer >= 0) or 'best' (the best-scoring
  step kept by config.checkpoint.keep_best)."""
  syntactic_help = "an integer >= 0 or 'best'"

  def parse(self, argument):
    if argument in (None, 'best') or isinstance(argument, int):
      return argument
    if not str(argument).isdigit():
      raise ValueError(f"--step must be an integer >= 0 or 'best', got {argument!r}")
    return int(argument)

  def flag_type(self):
    return 'step'


def define_step_flag(fv: flags.FlagValues, help_text: str) -> None:
  flags.DEFINE(StepParser(), 'step', None, help_text + " 'best': the best "
               'kept by config.checkpoint.keep_best.', flag_values=fv)


def define_model_flags(fv: flags.FlagValues) -> None:
  """--workdir | --checkpoint (with --model, --image_size, --class_names), --step."""
  flags.DEFINE_string('workdir', None, 'A train.py workdir: model, image size '
                      'and class names come from its saved config.',
                      flag_values=fv)
  define_step_flag(fv, 'Checkpoint step of --workdir (default: the latest).')
  flags.DEFINE_string('checkpoint', None, 'A released-layout .npz (e.g. from '
                      'vit_jax.tools.export); needs --model and --image_size. An int8 '
                      'file of vit_jax.tools.quantize names both itself.',
                      flag_values=fv)
  flags.DEFINE_string('model', None, 'Registered model name of --checkpoint, '
                      'e.g. ViT-B_16.', flag_values=fv)
  flags.DEFINE_integer('image_size', None, 'Input resolution --checkpoint was '
                       'trained at, e.g. 384.', flag_values=fv)
  flags.DEFINE_string('class_names', None, 'Text file with one class name per '
                      'line for --checkpoint (default: class indices).',
                      flag_values=fv)


def load_model(fv: flags.FlagValues) -> 'loading.TrainedModel':
  """The model the --workdir or --checkpoint flags name."""
  # Here, not at the top: loading decodes images and preprocesses them with
  # TensorFlow, which the tools that only build and time models do not need.
  from vit_jax.tools import loading  # pylint: disable=g-import-not-at-top
  if bool(fv.workdir) == bool(fv.checkpoint):
    raise ValueError('give exactly one of --workdir=DIR or --checkpoint=FILE.npz')
  if fv.workdir:
    return loading.load_workdir(fv.workdir, fv.step)
  if fv.step is not None:
    raise ValueError('--step picks a checkpoint of --workdir; a --checkpoint '
                     'file holds one set of params.')
  from vit_jax.checkpoint import quantized  # pylint: disable=g-import-not-at-top
  if quantized.is_quantized(fv.checkpoint):  # It names its model and input.
    trained = loading.load_quantized(fv.checkpoint,
                                     class_names_file=fv.class_names)
    if fv.model and fv.model != trained.model_config.name:
      raise ValueError(f'{fv.checkpoint} holds {trained.model_config.name}, '
                       f'not --model={fv.model}')
    if fv.image_size and fv.image_size != trained.image_size:
      raise ValueError(f'{fv.checkpoint} takes {trained.image_size} px input, '
                       f'not --image_size={fv.image_size}')
    return trained
  if not fv.model or not fv.image_size:
    raise ValueError('--checkpoint needs --model (e.g. ViT-B_16) and '
                     '--image_size (e.g. 384).')
  return loading.load_released(fv.checkpoint, fv.model, fv.image_size,
                               class_names_file=fv.class_names)


def check_output_path(path: str, flag: str) -> None:
  """Refuses an output path whose folder does not exist, before any work."""
  if '://' in path:  # gs:// and other URLs: through epath (and TensorFlow).
    from etils import epath  # pylint: disable=g-import-not-at-top
    folder, exists = epath.Path(path).parent, epath.Path(path).parent.is_dir()
  else:  # Local: no epath, which may import TensorFlow (the TF-free tools).
    folder = os.path.dirname(os.path.abspath(path))
    exists = os.path.isdir(folder)
  if not exists:
    raise FileNotFoundError(f'--{flag}={path}: folder {folder} does not exist '
                            '(create it, or write somewhere else)')


def run(define: Define, main: Main, argv: Sequence[str] | None = None,
        doc: str = '') -> int:
  """Parses `argv` (default sys.argv) with the tool's flags and runs `main`.

  `doc` (the tool's module docstring) and the flags are printed for --help.
  Returns the exit code: 0, 1 for a refusal, 2 for bad flags.
  """
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  define(fv, argv)
  if {'-h', '--help', '--helpfull'} & set(argv[1:]):
    print(f'{doc.strip()}\n\nFlags:\n{fv.get_help()}\n  --verbose: on a '
          'refusal, show the traceback too.')
    return 0

  def parse_and_run():
    rest = refusals.parse_flags(fv, argv)
    # A tool's --config (if it has one) splits the CPU like train.py does.
    startup.prepare_process(fv.config if 'config' in fv else None,
                            quiet_below=logging.ERROR)
    main(fv, rest[1:])

  return refusals.run_refusing(parse_and_run, argv)
