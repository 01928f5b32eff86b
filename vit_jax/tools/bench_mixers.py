"""Scaling sweep of the token mixers: `vit_jax.tools.benchmark --sweep=mixers`.

    python -m vit_jax.tools.benchmark --sweep=mixers --sweep_json=mixers.json \\
        --sweep_plot=mixers.png

Softmax attention costs ~tokens^2, FAVOR+ ~tokens * features, AFNO and GFNet's
global filter ~tokens * log(tokens); where one overtakes another is measured
here. Timed: one encoder block per mixer at the Ti width (hidden 192, MLP 768,
3 heads) on square token grids (the Fourier mixers need one), and the Ti models
(ViT-Ti_16-gap with 'xla' and 'favor' attention, AFNO-Ti_16, GFNet-Ti) at
--sweep_sizes px. infer is the jitted forward; train is, for a block, forward
and backward of a scalar loss to the params and the input (a block's cost in a
deep model), for a model the trainer's own step (steps.jit_train_step with
--config's optimizer, default AdamW + clipping).

Each point runs on one device in a process of its own (`python -m
vit_jax.tools.bench_mixers --point=JSON` prints one JSON line), as peak memory
only grows within a process: the device's `peak_bytes_in_use` where reported
(GPU, TPU), else the peak RSS (ru_maxrss, JAX itself and the compiler
included; `base_rss_mb` is before the build). The parent never starts a JAX
backend, so a GPU is the point's alone. A point that fails (error, out of
memory, --sweep_timeout) is recorded with its error and the sweep goes on.
After a warm-up step, each timed run is >= --sweep_steps steps and 0.1 s; the
median of --sweep_repeats runs is reported. The crossing table: per mixer and
mode, the smallest measured token count at which it beats softmax attention.
"""

import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import steps
from vit_jax.models import fourier
from vit_jax.models import vit
from vit_jax.models.precision import get_policy
from vit_jax.tools import bench_mixers_report as mixers_report
from vit_jax.tools import bench_timing
from vit_jax.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIXERS, MODES, KINDS = mixers_report.MIXERS, mixers_report.MODES, mixers_report.KINDS
# Per family: the one-block shape (hidden, mlp, heads), and per mixer the
# registered model and its overrides. 'test' is the registry's tiny models.
FAMILIES = {
    'Ti': ((192, 768, 3), {
        'softmax': ('ViT-Ti_16-gap', {}),
        'favor': ('ViT-Ti_16-gap', {'attention_impl': 'favor'}),
        'afno': ('AFNO-Ti_16', {}), 'global_filter': ('GFNet-Ti', {})}),
    'test': ((32, 64, 2), {
        'softmax': ('ViT-test_4-gap', {}),
        'favor': ('ViT-test_4-gap', {'attention_impl': 'favor'}),
        'afno': ('AFNO-test_4', {}), 'global_filter': ('GFNet-test', {})}),
}
# A timed run lasts at least this long: a 1 ms step timed once is dispatch noise.
_MIN_RUN_S = 0.1
_SCHEDULE_STEPS = 10_000  # Shapes the learning rate only, not a step's cost.


def make_points(fv: flags.FlagValues) -> list[dict[str, Any]]:
  """Every point the flags ask for; raises ValueError before any is run."""
  if fv.compare or fv.pipeline:
    raise ValueError('--sweep=mixers times its own steps; drop --compare and '
                     '--pipeline.')
  for name in ('sweep_batch', 'sweep_model_batch', 'sweep_steps',
               'sweep_repeats', 'sweep_timeout'):
    if fv[name].value < 1:
      raise ValueError(f'--{name} must be >= 1, got {fv[name].value}.')
  unknown = sorted(set(fv.sweep_mixers) - set(MIXERS))
  if unknown or not fv.sweep_mixers:
    raise ValueError(f'--sweep_mixers: {unknown or "none"} not in {MIXERS}.')
  try:
    values = {'block': [int(v) for v in fv.sweep_tokens],
              'model': [int(v) for v in fv.sweep_sizes]}
  except ValueError as e:
    raise ValueError(f'--sweep_tokens, --sweep_sizes: {e}') from None
  for t in values['block']:
    if t < 1 or math.isqrt(t) ** 2 != t:
      raise ValueError(f'--sweep_tokens: {t} is not a square grid (16, 64, '
                       '256, ...), which the Fourier mixers need.')
  (hidden, mlp, heads), family = FAMILIES[fv.sweep_family]
  train_config = json.loads(fv.config.to_json())
  points = []
  for kind in KINDS:
    for mode in MODES:
      for mixer in (m for m in MIXERS if m in fv.sweep_mixers):
        name, overrides = family[mixer]
        for value in values[kind]:
          point = dict(kind=kind, mixer=mixer, mode=mode, model=name,
                       overrides=overrides, precision=fv.precision,
                       steps=fv.sweep_steps, repeats=fv.sweep_repeats)
          if kind == 'block':
            point.update(tokens=value, batch=fv.sweep_batch, overrides=dict(
                overrides, hidden_size=hidden, mlp_dim=mlp, num_heads=heads))
          else:
            models.check_image_size(name, value)
            patch = models.get_model_config(name).patch_size[0]
            point.update(tokens=(value // patch) ** 2, image_size=value,
                         batch=fv.sweep_model_batch, num_classes=fv.num_classes)
            if mode == 'train':
              point['train_config'] = train_config
          points.append(point)
  return points


# --------------------------------------------------------------------------------
# One point: build, compile, time, measure.
# --------------------------------------------------------------------------------
def _init(make: Any, sharding: Any = None) -> Any:
  """make() compiled unoptimised: init is not timed, and optimising took 2-7x
  longer than that compile (CPU)."""
  lowered = jax.jit(make, out_shardings=sharding).lower()
  return lowered.compile({'xla_backend_optimization_level': 0})()


def _build_block(point: dict[str, Any]) -> tuple[Any, tuple[Any, ...], Any]:
  """(function to jit, its arguments, params) of a one-block point: the block
  the point's model stacks (vit.block_options), at the point's width."""
  config = models.get_model_config(point['model'])
  config.update(point['overrides'])
  vit.check_mixer(config)
  kwargs = dict(vit.block_options(config), mlp_dim=config.mlp_dim,
                dropout_rate=config.dropout_rate, precision=point['precision'])
  if config.token_mixer == 'attention':
    block = vit.Encoder1DBlock(**kwargs)
  else:
    side = math.isqrt(point['tokens'])
    block = fourier.FourierBlock(grid=(side, side),
                                 token_mixer=config.token_mixer, **kwargs)
  key = jax.random.key(0)
  x = jax.random.normal(key, (point['batch'], point['tokens'], config.hidden_size)
                        ).astype(get_policy(point['precision']).activation_dtype)
  params = _init(lambda: block.init(key, x, True)['params'])
  if point['mode'] == 'infer':
    return (lambda p, x: block.apply({'params': p}, x, True)), (params, x), params

  def loss(p, x, rng):  # FAVOR+ draws new features each step, as in training.
    y = block.apply({'params': p}, x, False, 0.0,
                    rngs={'dropout': rng, 'favor': rng})
    return jnp.mean(jnp.square(y.astype(jnp.float32)))
  return jax.value_and_grad(loss, argnums=(0, 1)), (params, x, key), params


def _build_model(point: dict[str, Any]) -> tuple[Any, tuple[Any, ...], Any]:
  """(jitted function, its arguments, params) of a full-model point."""
  model = models.create_model(point['model'], point['num_classes'],
                              precision=point['precision'], **point['overrides'])
  size, batch, classes = point['image_size'], point['batch'], point['num_classes']
  shape = (size, size, 3)
  mesh = parallel.make_mesh(1)
  replicated = parallel.replicated(mesh)
  rng = np.random.default_rng(0)
  data = parallel.to_global_batch(
      {'image': rng.uniform(-1, 1, (batch,) + shape).astype(np.float32),
       'label': rng.integers(0, classes, batch).astype(np.int32)}, mesh)
  if point['mode'] == 'infer':
    params = _init(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape),
                                      train=False)['params'], replicated)
    forward = jax.jit(lambda p, b: model.apply({'params': p}, b['image']))
    return forward, (params, data), params
  config = ml_collections.ConfigDict(point['train_config'])
  tx, _ = optim.make_optimizer(config, _SCHEDULE_STEPS)
  state = _init(functools.partial(
      steps.create_train_state, model, tx, shape, config.seed,
      ema=config.train.ema_decay > 0), replicated)
  step = steps.jit_train_step(config, model, tx, num_classes=classes, mesh=mesh,
                              state_sharding=replicated)
  return step, (state, data), state.params


def run_point(point: dict[str, Any]) -> dict[str, Any]:
  """Times one point in this process; the result holds the point's fields."""
  jax.devices()  # The backend first, so that base_rss_mb includes it.
  base_rss = bench_timing.peak_rss_mb()
  start = time.perf_counter()
  build = _build_block if point['kind'] == 'block' else _build_model
  fn, args, params = build(point)
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  lowered = (fn if hasattr(fn, 'lower') else jax.jit(fn)).lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  holder = list(args)
  carry = point['kind'] == 'model' and point['mode'] == 'train'

  def run(n: int) -> int:
    out = None
    for _ in range(n):
      out = compiled(*holder)
      if carry:  # The train state is donated: keep only the newest.
        holder[0] = out[0]
    jax.block_until_ready(out)
    return n

  start = time.perf_counter()
  run(1)  # Warm-up, and the length of a step.
  per_run = max(point['steps'],
                math.ceil(_MIN_RUN_S / max(time.perf_counter() - start, 1e-6)))
  times = bench_timing.time_rounds({'point': run}, steps_per_run=per_run,
                                   repeats=point['repeats'], warmup=0)['point']
  rss, device_peak = bench_timing.peak_rss_mb(), bench_timing.device_peak_memory()
  return dict(
      _fields(point), ok=True, params=num_params, compile_s=compile_s,
      steps_per_run=per_run, base_rss_mb=base_rss, peak_rss_mb=rss,
      peak_mb=rss if device_peak is None else device_peak / 2**20,
      memory='host peak RSS' if device_peak is None else 'device peak in use',
      backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
      **bench_timing.summarize(times, point['batch']))


def _fields(point: dict[str, Any]) -> dict[str, Any]:
  """The point, as its result repeats it: less the (long, shared) config."""
  return {k: v for k, v in point.items() if k != 'train_config'}


def run_point_here(point: dict[str, Any]) -> dict[str, Any]:
  """run_point, with an exception recorded as a failed point."""
  try:
    return run_point(point)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [''])[0]
    return dict(_fields(point), ok=False,
                error=f'{type(e).__name__}: {first[:500]}')


def run_point_subprocess(point: dict[str, Any], timeout_s: float
                         ) -> dict[str, Any]:
  """Times `point` in a fresh Python process; a crash is a failed point."""
  command = [sys.executable, '-m', 'vit_jax.tools.bench_mixers',
             '--point=' + json.dumps(point)]
  try:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return dict(_fields(point), ok=False, error=f'timed out after {timeout_s} '
                's (a hang? see --sweep_timeout)')
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  if lines:
    return json.loads(lines[-1])
  why = (f'exit code {proc.returncode}' if proc.returncode >= 0 else
         f'killed by signal {-proc.returncode}' +
         (' (SIGKILL: out of memory?)' if proc.returncode == -9 else ''))
  tail = ' | '.join(proc.stderr.splitlines()[-3:])
  return dict(_fields(point), ok=False, error=f'{why}: {tail}')


# --------------------------------------------------------------------------------
# The sweep (its report: bench_mixers_report.py).
# --------------------------------------------------------------------------------
def _write_json(result: dict[str, Any], path: str | None) -> None:
  if path:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)


def sweep(fv: flags.FlagValues) -> dict[str, Any]:
  """Runs every point, each in a subprocess unless --sweep_in_process."""
  points = make_points(fv)
  result = dict(sweep='mixers', family=fv.sweep_family, cpu=bench_timing.cpu_name(),
                backend=None, device_kind=None, precision=fv.precision,
                block_shape=FAMILIES[fv.sweep_family][0],
                block_batch=fv.sweep_batch, model_batch=fv.sweep_model_batch,
                min_steps=fv.sweep_steps, repeats=fv.sweep_repeats,
                in_process=fv.sweep_in_process, complete=False, points=[],
                crossings={})
  for i, point in enumerate(points):
    done = (run_point_here(point) if fv.sweep_in_process
            else run_point_subprocess(point, fv.sweep_timeout))
    result['points'].append(done)
    if done['ok'] and result['backend'] is None:
      result['backend'], result['device_kind'] = done['backend'], done['device_kind']
    status = (f"{mixers_report.format_number(done['img_per_sec'])} img/s, {done['peak_mb']:.0f} MB"
              if done['ok'] else f"FAILED: {done['error']}")
    print(f"[{i + 1}/{len(points)}] {point['kind']} {point['mixer']} "
          f"{point['mode']} {point['tokens']} tokens: {status}",
          file=sys.stderr, flush=True)
    _write_json(result, fv.sweep_json)  # A long sweep keeps what it has.
  result['crossings'] = {kind: mixers_report.crossings(result['points'], kind) for kind in KINDS}
  result['complete'] = True
  return result


def main(fv: flags.FlagValues) -> None:
  """The benchmark tool's --sweep=mixers: sweep, print, write JSON and plot."""
  result = sweep(fv)
  report = mixers_report.format_report(result)
  result['report'] = report.splitlines()
  print(report)
  _write_json(result, fv.sweep_json)
  if fv.sweep_plot:
    mixers_report.write_plot(result, fv.sweep_plot)


def _define_point_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string('point', None, 'One point of the sweep, as JSON.',
                      flag_values=fv, required=True)


def _point_main(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # The child's stdout is this one line.
  print(json.dumps(run_point_here(json.loads(fv.point))), flush=True)


if __name__ == '__main__':
  sys.exit(cli.run(_define_point_flags, _point_main, doc=__doc__))
