"""Throughput, compile time, memory and MFU of the train or inference step.

    python -m vit_jax.tools.benchmark --model=ViT-S_16 --batch=16 --mode=train \\
        --compare=timm --json=s16_train.json
    python -m vit_jax.tools.benchmark --model=quickstart --batch=128 --mode=infer
    python -m vit_jax.tools.benchmark --pipeline              # quickstart's input
    python -m vit_jax.tools.benchmark --pipeline --pipeline_jpegs=512 \\
        --model=ViT-S_16 --batch=16 --config.input.image_size=224 \\
        --config.input.channels=3 \\
        --config.pp.train_crop=inception
    python -m vit_jax.tools.benchmark --sweep=mixers --sweep_json=mixers.json \\
        --sweep_plot=mixers.png                # bench_mixers.py: token mixers
    python -m vit_jax.tools.benchmark --model=ViT-S_16 --mode=infer \\
        --tome_r=0,8,16                        # token merging, interleaved
    python -m vit_jax.tools.benchmark --model=ViT-S_16 --precision=mixed_bf16 \\
        --profile_dots                 # each product's rate in the step vs alone

The train step timed is the trainer's own (steps.make_train_step with the
--config's optimizer, default configs/quickstart.py = AdamW + clipping, jitted
on the mesh with the state donated), on random data already on the devices.
After --warmup steps, each timed run is --steps steps; the report is the median
of --repeats runs. `--model=quickstart` (or `config`) is the model section of
--config at its image size and channels. --config's `cpu_devices` applies to
every model: the default config's 2 splits a CPU host into two devices
(`--config.mesh.cpu_devices=0` for JAX's one).

`--compare=timm` builds the same shape in timm (PyTorch, needs
requirements-bench.txt) and interleaves the runs, [ours, timm] x repeats,
because a shared machine's speed drifts over minutes: `ratio_vs_timm` is the
median of the per-round ratios, the number to trust. `--compare=timm,timm_compile`
adds timm's model under `torch.compile` as a second peer (`ratio_vs_timm_compile`).
`--precision` picks our policy (vit_jax/models/precision.py); timm then runs in
the matching precision: float32, or `torch.autocast('cpu'/'cuda', bfloat16)`
for mixed_bf16 and bfloat16 (`timm_precision` in the JSON). `--pipeline` times
data.train_iterator for --config (images/s of host batches) interleaved with
the train step of the same shape; `pipeline_over_step` should be >= 5 so the
input never starves the step. `--pipeline_jpegs=N` first writes N random JPEGs
(10 classes) to a temporary image folder and reads that instead. `--tome_r`
sets the model's token merging (ToMe, vit_jax/models/tome.py); several values
time one model each, interleaved (bench_tome.py: `tome_r=R`, `speedup`).
`--quantized=F.npz` times an int8 file's model in int8 and in float32,
interleaved (inference; bench_quantized.py: `int8`, `speedup`, its size).
`--profile_dots`, after the timing, profiles our step and times each of its
matrix products alone (bench_dots.py: `profile_dots`).

FLOPs are XLA's cost analysis of the lowered step (global batch); MFU is
against flops.peak_flops_per_device (datasheet bf16 on GPU/TPU, a measured
float32 matmul on CPU). `peak_rss_mb` is the process's peak resident memory
when our step has run, before torch is imported.
"""

import contextlib
import copy
import json
import statistics
import sys
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import flops
from vit_jax import models
from vit_jax import parallel
from vit_jax import run_setup
from vit_jax import steps
from vit_jax import xla_flags
from vit_jax.models import precision
from vit_jax.tools import bench_dots
from vit_jax.tools import bench_flags
from vit_jax.tools import bench_mixers
from vit_jax.tools import bench_quantized
from vit_jax.tools import bench_timing
from vit_jax.tools import bench_timm
from vit_jax.tools import bench_tome
from vit_jax.tools import cli

# --model values that mean "the model section of --config".
FROM_CONFIG = ('quickstart', 'config')
# The schedule's length only shapes the learning rate, not the cost of a step.
_SCHEDULE_STEPS = 10_000

Run = bench_timing.Run
# cli.run(benchmark.define_flags, benchmark.main): the flags live in bench_flags.
define_flags = bench_flags.define_flags


# --------------------------------------------------------------------------------
# What to build: model config, input shape, classes.
# --------------------------------------------------------------------------------
def resolve_shape(fv: flags.FlagValues, num_classes: int | None = None
                  ) -> tuple[Any, tuple[int, int, int], int]:
  """(model name or config section, (size, size, channels), num_classes).

  A flag given on the command line always wins; otherwise --config supplies
  the image size and channels for its own model and for --pipeline, and
  `num_classes` (the dataset's, or 10 = Fashion-MNIST for quickstart).
  """
  config = fv.config
  from_config = fv.model in FROM_CONFIG
  model = config.model if from_config else fv.model
  models.get_model_config(model if isinstance(model, str) else model.name)
  use_config = from_config or fv.pipeline
  size = fv.image_size if fv['image_size'].present or not use_config else (
      config.input.image_size)
  channels = fv.channels if fv['channels'].present or not use_config else (
      config.input.channels)
  if not fv['num_classes'].present and (from_config or num_classes):
    classes = num_classes or 10
  else:
    classes = fv.num_classes
  models.check_image_size(model, size)
  return model, (size, size, channels), classes


def model_fields(model: Any, precision_name: str) -> ml_collections.ConfigDict:
  """The resolved hyperparameters (hidden_size, num_layers, ...) of `model`."""
  if isinstance(model, str):
    fields = models.get_model_config(model)
  else:
    fields = models.get_model_config(model.name)
    fields.update({k: v for k, v in model.items() if k != 'name' and v is not None})
  fields.precision = precision_name
  return fields


# --------------------------------------------------------------------------------
# Our steps, compiled as the trainer compiles them.
# --------------------------------------------------------------------------------
def _bench_config(config: ml_collections.ConfigDict, model_fields_: Any,
                  batch: int, shape: tuple[int, int, int]
                  ) -> ml_collections.ConfigDict:
  """`config` with the benchmark's model, batch and input shape."""
  bench = copy.deepcopy(config)
  with bench.unlocked():
    bench.model = model_fields_
  bench.batch_size = batch
  bench.input.image_size, bench.input.channels = shape[0], shape[2]
  return bench


def build_jax_step(config: ml_collections.ConfigDict, model_fields_: Any,
                   mode: str, batch: int, shape: tuple[int, int, int],
                   num_classes: int) -> tuple[Run, dict[str, Any]]:
  """Compiles our train (or forward) step; returns run(n) and its facts.

  Facts: compile_s, flops_per_step (global, from the lowered program),
  num_devices, params and `compiled`, the executable (not for the JSON). The
  train step is the trainer's: run_setup.build's model, optimizer and state
  shardings for the config, steps.jit_train_step, AOT-compiled.
  """
  config = _bench_config(config, model_fields_, batch, shape)
  mesh = parallel.make_mesh(data=config.mesh.data, model=config.mesh.model)
  parallel.check_batch_size(batch, mesh, config.train.accum_steps)
  replicated = parallel.replicated(mesh)
  data = bench_timing.random_batch(batch, shape, num_classes, mesh)
  start = time.perf_counter()
  if mode == 'train':
    parts = run_setup.build(config, mesh, num_classes=num_classes,
                            total_steps=_SCHEDULE_STEPS)
    model = parts.model
    holder = {'state': jax.jit(parts.init_fn, out_shardings=parts.state_sharding)()}
    lowered = steps.jit_train_step(
        config, model, parts.tx, num_classes=num_classes, mesh=mesh,
        state_sharding=parts.state_sharding).lower(holder['state'], data)
    compiled = lowered.compile()

    def run(n: int) -> int:  # The state is donated: keep only the newest.
      for _ in range(n):
        holder['state'], _ = compiled(holder['state'], data)
      jax.block_until_ready(holder['state'])
      return n
  else:
    model = models.create_model(config.model, num_classes)
    params = jax.jit(lambda: model.init(
        jax.random.key(config.seed), jnp.zeros((1,) + shape), train=False
    )['params'], out_shardings=replicated)()
    lowered, compiled, run = bench_timing.compile_forward(model, params, data,
                                                          mesh)
  compile_s = time.perf_counter() - start
  print(f'compiled our {mode} step in {compile_s:.1f}s', file=sys.stderr, flush=True)

  tree = holder['state'].params if mode == 'train' else params
  step_flops = (
      flops.train_step_flops(lowered, model, shape, batch, config.train.accum_steps)
      if mode == 'train' else flops.step_flops(lowered))
  return run, {'compile_s': compile_s, 'flops_per_step': step_flops,
               'num_devices': mesh.devices.size,
               'params': sum(x.size for x in jax.tree.leaves(tree)),
               'compiled': compiled}


# --------------------------------------------------------------------------------
# The tool.
# --------------------------------------------------------------------------------
def benchmark(fv: flags.FlagValues) -> dict[str, Any]:
  """Builds, times and reports what the flags ask for (main checked them)."""
  run_setup.check_config(fv.config)
  precision.check_backend(fv.precision, jax.default_backend())
  if fv.compare:
    bench_timm.check_installed()
  config = fv.config
  runs: dict[str, Run] = {}
  extra: dict[str, Any] = {}
  batch = fv.batch
  with contextlib.ExitStack() as stack:
    num_classes = None
    if fv.pipeline:
      # Here, not at the top: the input pipeline is TensorFlow's, and timing a
      # step alone must not need it (a GPU machine may not have it).
      from vit_jax.tools import bench_pipeline  # pylint: disable=g-import-not-at-top
      if fv.pipeline_jpegs:
        config = stack.enter_context(
            bench_pipeline.jpeg_folder_config(config, fv.pipeline_jpegs))
      batch = fv.batch if fv['batch'].present else config.batch_size
      pipe_run, num_classes, extra = bench_pipeline.build_pipeline(config, batch)
      runs['pipeline'] = pipe_run
    if fv.quantized:  # The file names its model, input and classes.
      model, shape, num_classes = bench_quantized.float_model(fv.quantized)
    else:
      model, shape, num_classes = resolve_shape(fv, num_classes)
    fields = model_fields(model, fv.precision)
    if fv.compare:  # What timm cannot mirror fails before compiling.
      bench_timm.timm_kwargs(fields, shape, num_classes)
    tome_fields = bench_tome.variants(  # Unset: the model's own tome_r.
        fields, fv.tome_r if fv['tome_r'].present else None, shape[0])
    fields = tome_fields.pop('jax')
    mode = 'infer' if fv.quantized else fv.mode
    jax_run, facts = build_jax_step(config, fields, mode, batch, shape,
                                    num_classes)
    runs = {'jax': jax_run, **runs}
    variant_facts = {}  # Each timed in the same rounds, after ours.
    for name, variant in tome_fields.items():
      runs[name], variant_facts[name] = build_jax_step(
          config, variant, mode, batch, shape, num_classes)
    if fv.quantized:
      runs[bench_quantized.NAME], variant_facts[bench_quantized.NAME] = (
          bench_quantized.build_int8_step(config, fv.quantized, batch))
    jax_run(max(fv.warmup, 1))  # Our peak memory, before torch exists.
    rss = bench_timing.peak_rss_mb()
    for peer in fv.compare:  # timm, then timm_compile: [ours, peers] rounds.
      runs[peer], peer_facts = bench_timm.build_timm_step(
          fields, fv.mode, batch, shape, num_classes, config, fv.precision,
          compiled=peer == 'timm_compile')
      extra.update(peer_facts)
    times = bench_timing.time_rounds(runs, steps_per_run=fv.steps,
                                     repeats=fv.repeats, warmup=fv.warmup)
    if fv.profile_dots:  # After the timed rounds, which it would slow down.
      extra['profile_dots'] = bench_dots.report(
          facts['compiled'], jax_run, 1e3 * statistics.median(times['jax']))

  result = {
      'model': (fields.name if fv.quantized or fv.model not in FROM_CONFIG
                else fv.model),
      'mode': mode, 'batch': batch, 'image_size': shape[0],
      'channels': shape[2], 'num_classes': num_classes,
      'precision': fv.precision, 'xla_auto_flags': xla_flags.applied(),
      'steps': fv.steps, 'repeats': fv.repeats, 'warmup': fv.warmup,
      'tome_r': fields.get('tome_r', 0),
      'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
      'num_devices': facts['num_devices'], 'cpu': bench_timing.cpu_name(),
      'params': facts['params'], 'compile_s': facts['compile_s'],
      'peak_rss_mb': rss}
  result.update(bench_timing.summarize(times['jax'], batch))
  result.update(bench_timing.efficiency(
      facts['flops_per_step'], result['step_ms'] / 1e3, facts['num_devices'],
      fv.precision))
  device_peak = bench_timing.device_peak_memory()
  if device_peak is not None:
    result['device_peak_mb'] = device_peak / 2**20
  result.update(extra)
  for peer in fv.compare:
    result.update(bench_timing.summarize(times[peer], batch, prefix=f'{peer}_'))
    ratios = [t / j for j, t in zip(times['jax'], times[peer])]
    result[f'ratio_vs_{peer}_runs'] = ratios
    result[f'ratio_vs_{peer}'] = statistics.median(ratios)
  result.update(bench_timing.variant_report(times, variant_facts, batch))
  if fv.quantized:
    result[bench_quantized.NAME].update(
        {k: variant_facts[bench_quantized.NAME][k]
         for k in ('file_bytes', 'float_export_bytes')}, file=fv.quantized)
  if 'pipeline' in times:
    result.update(bench_timing.summarize(times['pipeline'], batch,
                                         prefix='pipeline_'))
    result['pipeline_over_step'] = statistics.median(
        [j / p for j, p in zip(times['jax'], times['pipeline'])])
  return result


def format_result(r: dict[str, Any]) -> str:
  """A few human-readable lines; the JSON holds everything."""
  mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') is not None else 'n/a'
  lines = [
      f"{r['model']} {r['mode']} batch {r['batch']} at {r['image_size']}px "
      f"({r['precision']}, {r['num_devices']} {r['backend']} device(s), {r['cpu']})",
      f"  ours: {r['img_per_sec']:.1f} img/s, {r['step_ms']:.1f} ms/step, "
      f"compile {r['compile_s']:.1f}s, MFU {mfu}, peak RSS {r['peak_rss_mb']:.0f} MB"]
  for peer in ('timm', 'timm_compile'):
    if f'{peer}_img_per_sec' in r:
      lines.append(
          f"  {peer}: {r[f'{peer}_img_per_sec']:.1f} img/s, "
          f"{r[f'{peer}_step_ms']:.1f} ms/step ({r['timm_precision']}, "
          f"{r['torch_threads']} torch threads); ours/{peer} "
          f"{r[f'ratio_vs_{peer}']:.2f}x (median of "
          f"{len(r[f'ratio_vs_{peer}_runs'])} interleaved rounds)")
  lines += (bench_tome.format_lines(r) + bench_quantized.format_lines(r) +
            bench_dots.format_lines(r))
  if 'pipeline_img_per_sec' in r:
    lines.append(f"  input pipeline ({r['pipeline_dataset']}): "
                 f"{r['pipeline_img_per_sec']:.0f} img/s = "
                 f"{r['pipeline_over_step']:.1f}x the train step")
  return '\n'.join(lines)


def main(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # cli.run applied the config's CPU device split, as train.py does.
  bench_flags.check_flags(fv)
  # The XLA flags of the timed policy (cli.run applied --config's model's).
  xla_flags.apply(fv.precision, fv.config.get(xla_flags.CONFIG_KEY, True))
  for flag in ('json', 'sweep_json', 'sweep_plot'):  # Before minutes of timing.
    if fv[flag].value:
      cli.check_output_path(fv[flag].value, flag)
  if fv.sweep:  # Many points, each in its own process.
    bench_mixers.main(fv)
    return
  result = benchmark(fv)
  print(format_result(result))
  if fv.json:
    with open(fv.json, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
