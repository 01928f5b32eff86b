"""Timing helpers of vit_jax.tools.benchmark: interleaved rounds, medians,
FLOP/s and MFU, host and device memory, the CPU's name.
"""

import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from vit_jax import flops
from vit_jax import parallel
from vit_jax.models import precision

# run(n): at least n steps, returns when they have finished, and how many ran.
Run = Callable[[int], int]


def random_batch(batch: int, shape: tuple[int, ...], num_classes: int,
                 mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """The timed steps' input: uniform images in [-1, 1] and random labels
  (seeded, so every model of a run sees the same batch), split over `mesh`."""
  rng = np.random.default_rng(0)
  local = {'image': rng.uniform(-1, 1, (batch,) + shape).astype(np.float32),
           'label': rng.integers(0, num_classes, batch).astype(np.int32)}
  return parallel.to_global_batch(local, mesh)


def compile_forward(model: Any, params: Any, data: dict[str, jax.Array],
                    mesh: jax.sharding.Mesh
                    ) -> tuple[jax.stages.Lowered, jax.stages.Compiled, Run]:
  """`model.apply(train=False)` jitted on `mesh` (params replicated, the batch
  split), lowered and AOT-compiled: (lowered, compiled, run(n) of n forwards)."""
  replicated = parallel.replicated(mesh)
  forward = lambda p, b: model.apply({'params': p}, b['image'], train=False)
  lowered = jax.jit(forward, in_shardings=(replicated,
                                           parallel.batch_sharding(mesh)),
                    out_shardings=replicated).lower(params, data)
  compiled = lowered.compile()

  def run(n: int) -> int:
    out = None
    for _ in range(n):
      out = compiled(params, data)
    jax.block_until_ready(out)
    return n

  return lowered, compiled, run


def time_rounds(runs: dict[str, Run], *, steps_per_run: int, repeats: int,
                warmup: int) -> dict[str, list[float]]:
  """Seconds per step of each run in each round: {name: [round_0, ...]}.

  Every runner is warmed up first; then each round times each runner once, in
  order, so a drift of the machine's speed hits all of them alike.
  """
  for run in runs.values():
    if warmup:
      run(warmup)
  times = {name: [] for name in runs}
  for round_ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      done = run(steps_per_run)
      times[name].append((time.perf_counter() - start) / done)
    print(f'round {round_ + 1}/{repeats}: ' + ', '.join(  # Progress: runs are slow.
        f'{name} {1e3 * t[-1]:.0f} ms/step' for name, t in times.items()),
          file=sys.stderr, flush=True)
  return times


def device_peak_memory() -> int | None:
  """Peak bytes in use on device 0, where the backend reports it (not CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def peak_rss_mb() -> float:
  """The process's peak resident set size so far (Linux reports KiB)."""
  scale = 1.0 if sys.platform == 'darwin' else 1024.0
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def summarize(seconds: list[float], batch: int, prefix: str = '') -> dict[str, Any]:
  """Median img/s and step time of per-step times (one per round)."""
  step_s = statistics.median(seconds)
  return {f'{prefix}img_per_sec': batch / step_s, f'{prefix}step_ms': 1e3 * step_s,
          f'{prefix}img_per_sec_runs': [batch / s for s in seconds]}


def efficiency(step_flops: float | None, step_s: float, num_devices: int,
               precision_name: str = 'float32') -> dict[str, Any]:
  """flops_per_sec and mfu (None where cost analysis or the peak is unknown);
  on CPU the peak is the measured matmul of the policy's product dtype."""
  product = precision.get_policy(precision_name).product_dtype
  peak = flops.peak_flops_per_device(jax.devices()[0], product_dtype=product)
  if not step_flops:
    return {'flops_per_step': None, 'flops_per_sec': None, 'mfu': None,
            'peak_flops_per_device': peak}
  return {'flops_per_step': step_flops, 'flops_per_sec': step_flops / step_s,
          'mfu': (flops.mfu(step_flops, step_s, num_devices, peak)
                  if peak else None),
          'peak_flops_per_device': peak}


def cpu_name() -> str:
  """The CPU's model name (lscpu's), for the report."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def variant_report(times: dict[str, list[float]],
                   facts: dict[str, dict[str, Any]], batch: int,
                   baseline: str = 'jax') -> dict[str, dict[str, Any]]:
  """{name: img/s, step time, speedup over `baseline`, compile time, FLOPs}
  for each variant timed in the same rounds as `baseline` (`speedup` is the
  median per-round ratio of the baseline's step time over the variant's)."""
  out = {}
  for name, fact in facts.items():
    out[name] = dict(summarize(times[name], batch))
    out[name].update(
        speedup=statistics.median(
            [b / t for b, t in zip(times[baseline], times[name])]),
        compile_s=fact['compile_s'], flops_per_step=fact['flops_per_step'])
  return out
