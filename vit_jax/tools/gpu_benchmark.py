"""The GPU numbers in one command: our train step against timm's, side by side.

    bash scripts/gpu_benchmark.sh               # one H100/H200, under 8 minutes
    bash scripts/gpu_benchmark.sh --dry_run     # anywhere: a tiny model on the CPU
    python -m vit_jax.tools.gpu_benchmark --models=ViT-B_16 --attention=fused \\
        --json=gpu.json

One row per --models x --attention ('xla': the explicit softmax; 'fused':
jax.nn.dot_product_attention, whose compiled kernel the row names): the
trainer's train step (benchmark.build_jax_step with configs/quickstart.py's
AdamW, clipping and loss) at --batch and --image_size in --precision, against
timm's train step with the same shape and optimizer under
torch.autocast(bfloat16) with timm's default fused attention (SDPA), timed in
interleaved rounds as benchmark.py does. Remat only where memory needs it
(gpu_benchmark_steps.py); timm gets what our step leaves, and falls back to its
gradient checkpointing when that is not enough. A row that would run past
--time_budget_s is skipped and says so; the JSON is rewritten after every
row. docs/gpu_benchmark.md says what each column means.
"""

import copy
import gc
import importlib
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

from absl import flags
import jax
import ml_collections

from configs import quickstart
from vit_jax import flops
from vit_jax import models
from vit_jax.models import precision
from vit_jax.tools import bench_timing
from vit_jax.tools import bench_timm
from vit_jax.tools import benchmark
from vit_jax.tools import cli
from vit_jax.tools import gpu_benchmark_steps as steps_lib

ATTENTION = ('xla', 'fused')
# --dry_run: the same path on a model that compiles in seconds on a CPU.
DRY_RUN = {'models': ['ViT-test_4'], 'image_size': 16, 'batch': 4,
           'repeats': 1, 'steps': 1, 'warmup': 1}
# JAX's GPU allocator grows on demand (timm shares the device) up to this share.
JAX_MEMORY_FRACTION = '0.9'
MEMORY_FRACTION_VARS = ('XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_MEM_FRACTION')


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # No config file: the train step's config is quickstart's.
  flags.DEFINE_bool('dry_run', False, 'The same path on the CPU with a tiny '
                    'model: ' + ', '.join(f'--{k}={v}' for k, v in DRY_RUN.items())
                    + ' (a flag given still wins).', flag_values=fv)
  flags.DEFINE_list('models', 'ViT-B_16,ViT-L_16', 'Registered ViTs.',
                    flag_values=fv)
  flags.DEFINE_list('attention', ','.join(ATTENTION), 'Attention of our '
                    'model, one row each.', flag_values=fv)
  flags.DEFINE_enum('precision', 'bfloat16', precision.POLICIES, 'Our policy; '
                    'timm runs under torch.autocast(bfloat16) unless float32.',
                    flag_values=fv)
  flags.DEFINE_integer('batch', 256, 'Global batch.', flag_values=fv)
  flags.DEFINE_integer('image_size', 224, 'Input size.', flag_values=fv)
  flags.DEFINE_integer('num_classes', 1000, 'Head size.', flag_values=fv)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps of each step first.',
                       flag_values=fv)
  flags.DEFINE_integer('steps', 3, 'Steps per timed run.', flag_values=fv)
  flags.DEFINE_integer('repeats', 3, 'Interleaved rounds; medians reported.',
                       flag_values=fv)
  flags.DEFINE_bool('timm', True, "Time timm's step beside ours.",
                    flag_values=fv)
  flags.DEFINE_float('time_budget_s', 420.0, 'Skip a row that would end '
                     'later than this many seconds after the start.',
                     flag_values=fv)
  flags.DEFINE_integer('memory_limit_bytes', None, "Device memory to fit in "
                       "(default the allocator's bytes_limit; a CPU has none).",
                       flag_values=fv)
  flags.DEFINE_string('json', None, 'Write everything here.', flag_values=fv)


def check_flags(fv: flags.FlagValues) -> None:
  """ValueError for what cannot be timed, before anything is built."""
  for name, low in (('batch', 1), ('image_size', 1), ('num_classes', 1),
                    ('steps', 1), ('repeats', 1), ('warmup', 0),
                    ('memory_limit_bytes', 1)):
    if fv[name].value is not None and fv[name].value < low:
      raise ValueError(f'--{name} must be >= {low}, got {fv[name].value}.')
  if fv.time_budget_s <= 0:
    raise ValueError(f'--time_budget_s must be > 0, got {fv.time_budget_s}.')
  if not fv.models or not fv.attention:
    raise ValueError('--models and --attention each need at least one value.')
  unknown = sorted(set(fv.attention) - set(ATTENTION))
  if unknown:
    raise ValueError(f'--attention: {unknown} not in {ATTENTION}.')
  for model in fv.models:
    fields = benchmark.model_fields(model, fv.precision)
    models.check_image_size(model, fv.image_size)
    if fv.timm:  # What timm cannot mirror fails now, not after a compile.
      bench_timm.timm_kwargs(fields, _shape(fv), fv.num_classes)


def _shape(fv: flags.FlagValues) -> tuple[int, int, int]:
  return fv.image_size, fv.image_size, 3


def prepare_jax(dry_run: bool) -> None:
  """Before any device is touched: the CPU for a dry run; on a GPU, an
  allocator that takes memory as our steps need it rather than 75% up front,
  so that timm in the same process gets what they leave. Variables already
  set win (setting both spellings of the fraction is an error in jaxlib)."""
  if dry_run:
    jax.config.update('jax_platforms', 'cpu')
    return
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if not any(name in os.environ for name in MEMORY_FRACTION_VARS):
    os.environ[MEMORY_FRACTION_VARS[0]] = JAX_MEMORY_FRACTION


def check_devices(dry_run: bool) -> None:
  """One GPU (timm runs on one), or the CPU for a dry run."""
  backend, count = jax.default_backend(), len(jax.devices())
  if not dry_run and backend != 'gpu':
    raise ValueError(f'JAX found no GPU (its backend is {backend}): check the '
                     'CUDA plugin (pip list | grep jax), or try --dry_run.')
  if count != 1:
    raise ValueError(f'JAX sees {count} {backend} devices; this compares one '
                     'device with timm on one: set CUDA_VISIBLE_DEVICES=0 (or '
                     'drop the device count from XLA_FLAGS).')


def train_config() -> ml_collections.ConfigDict:
  """quickstart's optimizer and loss; JAX's own devices (no CPU split)."""
  config = quickstart.get_config()
  config.mesh.cpu_devices = 0
  return config


def timm_missing(device: str) -> str | None:
  """Why timm's half cannot run here, or None."""
  try:  # Importing, not only finding: a broken install counts as missing.
    torch = importlib.import_module('torch')
    importlib.import_module('timm')
  except ImportError as e:
    return (f'timm comparison skipped: torch and timm do not import ({e}); '
            'pip install -r requirements-bench.txt')
  if device == 'cuda' and not torch.cuda.is_available():
    return 'timm comparison skipped: torch sees no CUDA GPU'
  return None


def forward_flops(fields: Any, size: int, num_classes: int) -> float:
  """Analytic forward FLOPs of one image: what rows' times are scaled by."""
  patch = fields.patch_size[0]
  cls = fields.classifier == 'token'
  return flops.vit_forward_flops(
      fields.hidden_size, fields.num_layers, fields.mlp_dim,
      (size // patch) ** 2 + cls, patch, 3, num_classes, cls_token=cls)


def time_row(fv: flags.FlagValues, build: Callable[[str], steps_lib.Step],
             peer: steps_lib.TimmPeer | None, limit: int | None
             ) -> dict[str, Any]:
  """Builds our step (remat as memory needs), then times it against timm's."""
  step, remat, attempts = steps_lib.first_that_fits(
      build, steps_lib.REMAT_FALLBACK, limit)
  row = {'remat': remat, 'remat_attempts': attempts,
         'attention_kernel': step.facts['attention_kernel'],
         'compile_s': step.facts['compile_s'], 'params': step.facts['params'],
         'step_need_mb': (None if step.need_bytes is None
                          else step.need_bytes / 2**20)}
  notes = []
  if not attempts[-1]['fits']:
    notes.append(f'over {steps_lib.FIT_FRACTION:.0%} of the memory limit even '
                 f'with remat {remat}')
  runs = {'jax': step.run}
  timm_step = peer.get() if peer else None
  if timm_step:
    runs['timm'] = timm_step.run
  elif peer:
    notes.append(peer.note)
  times = bench_timing.time_rounds(runs, steps_per_run=fv.steps,
                                   repeats=fv.repeats, warmup=fv.warmup)
  row.update(bench_timing.summarize(times['jax'], fv.batch))
  row.update(bench_timing.efficiency(step.facts['flops_per_step'],
                                     row['step_ms'] / 1e3,
                                     step.facts['num_devices'], fv.precision))
  peak = bench_timing.device_peak_memory()
  row['device_peak_mb'] = None if peak is None else peak / 2**20
  if timm_step:
    row.update(bench_timing.summarize(times['timm'], fv.batch, prefix='timm_'))
    ratios = [t / j for j, t in zip(times['jax'], times['timm'])]
    row.update(timm_step.facts, ratio_vs_timm=statistics.median(ratios),
               ratio_vs_timm_runs=ratios)
    if timm_step.facts['timm_remat'] != 'none':
      notes.append('timm with gradient checkpointing (no room without)')
  if notes:
    row['note'] = '; '.join(notes)
  return row


def _error_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


# --------------------------------------------------------------------------------
# The tool.
# --------------------------------------------------------------------------------
def run_benchmark(fv: flags.FlagValues, elapsed: Callable[[], float],
                  write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Every row, in order; write(report) after each."""
  check_devices(fv.dry_run)
  precision.check_backend(fv.precision, jax.default_backend())
  device = 'cpu' if fv.dry_run else 'cuda'
  timm_note = (timm_missing(device) if fv.timm
               else 'timm comparison off (--notimm)')
  limit, source = steps_lib.memory_limit(fv.memory_limit_bytes)
  config = train_config()
  report = _header(fv, limit, source, timm_note, device)
  shape = _shape(fv)
  history = []  # (seconds, forward FLOPs) of each row done: the estimates.
  for model in fv.models:
    fields = benchmark.model_fields(model, fv.precision)
    work = forward_flops(fields, fv.image_size, fv.num_classes)
    peer = None if timm_note else steps_lib.TimmPeer(
        config, fields, fv.batch, shape, fv.num_classes, fv.precision, device)
    for attention in fv.attention:
      row = {'model': model, 'attention': attention}
      estimate = max((s * max(1.0, work / w) for s, w in history), default=0.0)
      if elapsed() + estimate > fv.time_budget_s:
        row.update(status='skipped', note=(
            f'skipped: {elapsed():.0f} s of the {fv.time_budget_s:.0f} s '
            'budget gone' + (f', and this row takes about {estimate:.0f} s'
                             if estimate else '')))
      else:
        start = time.monotonic()
        variant = copy.deepcopy(fields)
        variant.attention_impl = attention
        build = steps_lib.our_builder(config, variant, fv.batch, shape,
                                      fv.num_classes)
        try:
          row.update(time_row(fv, build, peer, limit), status='ok')
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()  # A failed row is reported; the rest still run.
          row.update(status='error', note=_error_line(e))
        gc.collect()  # Our step's state goes before the next row compiles.
        row['row_s'] = time.monotonic() - start
        history.append((row['row_s'], work))
      report['rows'].append(row)
      report['elapsed_s'] = elapsed()
      write(report)
    if peer:
      peer.close()
  _finish(report)
  write(report)
  return report


def _header(fv: flags.FlagValues, limit: int | None, source: str,
            timm_note: str | None, device: str) -> dict[str, Any]:
  """The report before its rows: what was asked for, on what."""
  return {
      'dry_run': fv.dry_run, 'mode': 'train', 'models': fv.models,
      'attention': fv.attention, 'precision': fv.precision, 'batch': fv.batch,
      'image_size': fv.image_size, 'num_classes': fv.num_classes,
      'warmup': fv.warmup, 'steps': fv.steps, 'repeats': fv.repeats,
      'time_budget_s': fv.time_budget_s, 'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'jax_version': jax.__version__, 'cpu': bench_timing.cpu_name(),
      'memory_limit_bytes': limit, 'memory_limit_source': source,
      'fit_fraction': steps_lib.FIT_FRACTION,
      'jax_allocator': {name: os.environ.get(name) for name in (
          'XLA_PYTHON_CLIENT_PREALLOCATE', *MEMORY_FRACTION_VARS)},
      'timm': f'compared on {device}' if timm_note is None else timm_note,
      'notes': [] if timm_note is None else [timm_note],
      'rows': [], 'elapsed_s': 0.0, 'complete': False}


def _finish(report: dict[str, Any]) -> None:
  rows = report['rows']
  report['complete'] = all(r['status'] != 'skipped' for r in rows)
  if report['backend'] == 'gpu' and any(
      r['attention'] == 'fused' and r.get('attention_kernel') == 'xla'
      for r in rows):
    report['notes'].append(
        "attention 'fused' compiled without cuDNN's kernel (kernel xla): "
        'jax.nn.dot_product_attention picks XLA unless asked for cuDNN')


_COLUMNS = (  # (header, width, row -> text)
    ('model', 10, lambda r: r['model']),
    ('attention', 9, lambda r: r['attention']),
    ('kernel', 6, lambda r: r.get('attention_kernel', '-')),
    ('remat', 13, lambda r: r.get('remat', '-')),
    ('img/s', 9, lambda r: _num(r, 'img_per_sec', '{:.1f}')),
    ('step ms', 8, lambda r: _num(r, 'step_ms', '{:.1f}')),
    ('MFU', 6, lambda r: _num(r, 'mfu', '{:.1%}')),
    ('need GiB', 8, lambda r: _num(r, 'step_need_mb', '{:.2f}', 2**-10)),
    ('peak GiB', 8, lambda r: _num(r, 'device_peak_mb', '{:.2f}', 2**-10)),
    ('timm img/s', 10, lambda r: _num(r, 'timm_img_per_sec', '{:.1f}')),
    ('timm ms', 8, lambda r: _num(r, 'timm_step_ms', '{:.1f}')),
    ('ours/timm', 9, lambda r: _num(r, 'ratio_vs_timm', '{:.2f}x')),
)


def _num(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
  value = row.get(key)
  return '-' if value is None else fmt.format(value * scale)


def format_table(report: dict[str, Any]) -> str:
  """The rows as one table, then the notes: what was skipped or fell back."""
  r = report
  lines = [
      ('DRY RUN (a tiny model on the CPU; its timings mean nothing): '
       if r['dry_run'] else '') +
      f"train step, batch {r['batch']} at {r['image_size']} px, "
      f"{r['precision']}, {r['device_kind']} (jax {r['jax_version']}); "
      f"timm: {r['timm']}",
      '  '.join(f'{name:>{width}}' for name, width, _ in _COLUMNS) + '  note']
  for row in r['rows']:
    lines.append('  '.join(f'{cell(row):>{width}}' for _, width, cell in _COLUMNS)
                 + '  ' + row.get('note', ''))
  lines += [f'note: {note}' for note in r['notes']]
  lines.append(f"{len(r['rows'])} rows in {r['elapsed_s']:.0f} s of a "
               f"{r['time_budget_s']:.0f} s budget; remat where our step would "
               f"pass {steps_lib.FIT_FRACTION:.0%} of "
               + (f"{r['memory_limit_bytes'] / 2**30:.1f} GiB "
                  f"({r['memory_limit_source']})" if r['memory_limit_bytes']
                  else 'the device memory (none reported here)'))
  return '\n'.join(lines)


def main(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  started = time.monotonic()
  if fv.json:
    cli.check_output_path(fv.json, 'json')
  for name, value in DRY_RUN.items():
    if fv.dry_run and not fv[name].present:
      fv[name].value = value
  check_flags(fv)
  prepare_jax(fv.dry_run)

  def write(report: dict[str, Any]) -> None:
    if fv.json:
      with open(fv.json, 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1)

  report = run_benchmark(fv, lambda: time.monotonic() - started, write)
  print(format_table(report))
  failed = [f"{r['model']}/{r['attention']}" for r in report['rows']
            if r['status'] == 'error']
  if failed:
    sys.exit(f'error: {len(failed)} row(s) failed ({", ".join(failed)}); '
             'their tracebacks are above the table.')


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
