"""Training metrics and log lines: writers, progress line, throughput and MFU,
curves plot, and `summarize_names` (a short listing of parameter names).

FLOP counting and the peak behind MFU live in vit_jax/flops.py.

A run's metrics go to two places: TensorBoard (through clu's writer) for browsing,
and `workdir/metrics.jsonl` for tools and tests, one JSON object per write:

  {"step": 1200, "train_loss": 0.4123, "learning_rate": 0.001, "img_per_sec": 812.0}

Metric names: train_loss, learning_rate, img_per_sec, mfu (a fraction of the peak,
0..1), grad_norm, steps_per_sec, and per eval split eval_<split>_{top1,top5,loss}.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Iterable, Mapping

from absl import logging

from vit_jax import flops

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
PLOT_FILE = 'curves.png'


# --------------------------------------------------------------------------------
# Log lines.
# --------------------------------------------------------------------------------
_NUMBERED_BLOCK = re.compile(r'^(.*?(?:encoderblock_|MixerBlock_))(\d+)/')


def summarize_names(names: list[str]) -> str:
  """A short, complete listing of flat param names for a log line.

  Names are grouped by module and numbered blocks are folded into a range, so a
  ViT-B's 152 backbone tensors read as `embedding/* (2), cls,
  Transformer/posembed_input/pos_embedding, Transformer/encoderblock_{0-11}/*
  (192), Transformer/encoder_norm/* (2)`: every tensor is accounted for.
  """
  groups: dict[str, tuple[list[str], set[int]]] = {}
  for name in names:
    block = _NUMBERED_BLOCK.match(name)
    if block:
      key = block.group(1) + '{}/*'
    else:
      key = name.rsplit('/', 1)[0] + '/*' if '/' in name else name
    members, blocks = groups.setdefault(key, ([], set()))
    members.append(name)
    if block:
      blocks.add(int(block.group(2)))
  parts = []
  for key, (members, blocks) in groups.items():
    if len(members) == 1:
      key = members[0]
    elif blocks:
      key = key.format('{' + _ranges(sorted(blocks)) + '}')
    parts.append(f'{key} ({len(members)})' if len(members) > 1 else key)
  return ', '.join(parts) if parts else 'none'


def _ranges(numbers: list[int]) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  spans: list[list[int]] = []
  for n in numbers:
    if spans and n == spans[-1][1] + 1:
      spans[-1][1] = n
    else:
      spans.append([n, n])
  return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in spans)


# --------------------------------------------------------------------------------
# Writers.
# --------------------------------------------------------------------------------
def _json_value(value: Any) -> float | None:
  # NaN/Inf are written as null: json.dumps would emit the bare token NaN, which
  # is not JSON and breaks strict readers (jq, browsers). read_metrics turns null
  # back into NaN, so a diverged run still shows where it diverged.
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsLogger:
  """Writes scalars to TensorBoard and to workdir/metrics.jsonl.

  Each `write` appends one line and flushes it, so a run that is killed keeps every
  line written so far. A resumed run passes `resume_step` (the checkpoint's step):
  lines after it, written by the killed run after its last checkpoint, are dropped
  so the file stays monotonic in step. TensorBoard keeps its own event files; its
  reader shows the overlap as a second series.

  In multi-host runs only process 0 should write: others pass `enabled=False` and
  every method is then a no-op (no files, no directories).
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      self.truncate_after(resume_step)
    # Imported here: clu's summary writer pulls in TensorFlow, which tools that only
    # read metrics do not need.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self._tb = metric_writers.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
    self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes `metrics` (name -> scalar: float, numpy or jax scalar) at `step`."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in metrics.items()}
    record = {'step': int(step)}
    record.update({name: _json_value(v) for name, v in scalars.items()})
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()
    self._tb.write_scalars(int(step), scalars)
    self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops lines with step > `step` (and any torn last line) from metrics.jsonl."""
    if not self.enabled or not os.path.exists(self.path):
      return
    if self._file is not None:
      self._file.flush()
    kept = [r for r in _read_records(self.path) if r['step'] <= step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      for record in kept:
        f.write(json.dumps(record, allow_nan=False) + '\n')
    os.replace(tmp, self.path)  # Atomic: a crash leaves the old or the new file.
    if self._file is not None:
      self._file.close()
      self._file = open(self.path, 'a', encoding='utf-8')

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _read_records(path: str) -> list[dict[str, Any]]:
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('Skipping a malformed line in %s: %r', path, line[:80])
  return records


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads workdir/metrics.jsonl: one dict per line, null values back to NaN.

  Returns [] when the run has not written anything yet.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  return [{k: (math.nan if v is None else v) for k, v in r.items()}
          for r in _read_records(path)]


# --------------------------------------------------------------------------------
# Progress line.
# --------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
  """Compact duration: 42s, 4m40s, 2h05m, 3d04h."""
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  s = int(round(seconds))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  if s < 86400:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  return f'{s // 86400}d{s % 86400 // 3600:02d}h'


# How the progress line shows well-known metrics; the rest follow as `name value`.
_PROGRESS_FORMATS = {
    'train_loss': lambda v: f'train_loss {v:.4f}',
    'learning_rate': lambda v: f'lr {v:.1e}',
    'img_per_sec': lambda v: f'{v:.0f} img/s',
    'mfu': lambda v: f'mfu {100 * v:.1f}%',
}


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any],
                    elapsed_s: float, steps_per_s: float | None) -> str:
  """One log line, e.g.

  step 1200/5000 (24%) | train_loss 0.4123 | lr 1.0e-03 | 812 img/s | mfu 31.2% |
  ETA 4m40s | elapsed 1m28s

  The ETA assumes the remaining steps run at `steps_per_s` (from the last
  interval; falls back to step / elapsed_s when None).
  """
  parts = [f'step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)']
  for name, fmt in _PROGRESS_FORMATS.items():
    if name in metrics:
      parts.append(fmt(float(metrics[name])))
  for name in sorted(set(metrics) - set(_PROGRESS_FORMATS)):
    if name != 'steps_per_sec':
      parts.append(f'{name} {float(metrics[name]):.4g}')
  if not steps_per_s and elapsed_s > 0:
    steps_per_s = step / elapsed_s
  eta = (total_steps - step) / steps_per_s if steps_per_s else math.nan
  parts.append(f'ETA {format_duration(eta)}')
  parts.append(f'elapsed {format_duration(elapsed_s)}')
  return ' | '.join(parts)


# --------------------------------------------------------------------------------
# Throughput.
# --------------------------------------------------------------------------------
class StepTimer:
  """Throughput over the steps between two log points.

  Call `reset(step)` once the first step has finished (so compilation is not
  counted) and again after anything that is not training (eval, checkpointing);
  call `lap(step)` at each log point. Both read the wall clock, so the caller must
  have waited for the device (e.g. fetched the step's metrics) before calling.
  """

  def __init__(self, examples_per_step: int, *, flops_per_step: float | None = None,
               num_devices: int = 1, peak_flops_per_device: float | None = None):
    self.examples_per_step = examples_per_step
    self.flops_per_step = flops_per_step
    self.num_devices = num_devices
    self.peak_flops_per_device = peak_flops_per_device
    self._start = time.perf_counter()
    self._origin: tuple[int, float] | None = None

  @property
  def elapsed_s(self) -> float:
    """Wall time since the timer was made (compilation and eval included)."""
    return time.perf_counter() - self._start

  def reset(self, step: int) -> None:
    self._origin = (step, time.perf_counter())

  def lap(self, step: int) -> dict[str, float]:
    """Returns steps_per_sec, img_per_sec and (if FLOPs and peak are known) mfu
    over the steps since the last reset/lap; {} before the first reset."""
    now = time.perf_counter()
    origin, self._origin = self._origin, (step, now)
    if origin is None or step <= origin[0] or now <= origin[1]:
      return {}
    seconds_per_step = (now - origin[1]) / (step - origin[0])
    out = {'steps_per_sec': 1.0 / seconds_per_step,
           'img_per_sec': self.examples_per_step / seconds_per_step}
    if self.flops_per_step and self.peak_flops_per_device:
      out['mfu'] = flops.mfu(self.flops_per_step, seconds_per_step, self.num_devices,
                       self.peak_flops_per_device)
    return out


# --------------------------------------------------------------------------------
# Curves plot.
# --------------------------------------------------------------------------------
def _series(records: Iterable[Mapping[str, Any]], name: str):
  points = [(r['step'], r[name]) for r in records
            if name in r and r[name] is not None and math.isfinite(r[name])]
  return [p[0] for p in points], [p[1] for p in points]


def save_curves_plot(workdir: str) -> str:
  """Writes workdir/curves.png (train loss; eval top-1 per split) and returns it.

  Uses matplotlib's Figure directly (Agg canvas, no pyplot), so it never opens a
  window or changes the caller's backend. Works with no eval points, or no data.
  """
  # Imported here: matplotlib is slow to import and only the plot needs it.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  records = read_metrics(workdir)
  fig = Figure(figsize=(10, 4), layout='constrained')
  loss_ax, acc_ax = fig.subplots(1, 2)
  loss_ax.plot(*_series(records, 'train_loss'), label='train_loss')
  loss_ax.set(xlabel='step', ylabel='loss', title='train loss')
  splits = sorted({m.group(1) for r in records for k in r
                   if (m := re.fullmatch(r'eval_(.+)_top1', k))})
  for split in splits:
    acc_ax.plot(*_series(records, f'eval_{split}_top1'), marker='o', label=split)
  acc_ax.set(xlabel='step', ylabel='top-1', title='eval top-1')
  if splits:
    acc_ax.legend()
  else:
    acc_ax.text(0.5, 0.5, 'no eval yet', ha='center', va='center',
                transform=acc_ax.transAxes)
  path = os.path.join(workdir, PLOT_FILE)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)  # A viewer never sees a half-written file.
  return path
