"""Device mesh, shardings and the two ways of running a data-parallel step.

Every run, from one CPU core to a pod slice, uses the same code path: a
`jax.sharding.Mesh` with axes (`data`, `model`) over all devices of all
processes, batches sharded along `data` (replicated along `model`), parameters
sharded as the rules of vit_jax.sharding say (default: replicated; FSDP over
`data`, tensor parallelism over `model`). Two step flavours:

* 'jit': the step is written for one device; `jax.jit` with in/out shardings lets
  XLA's SPMD partitioner insert the gradient all-reduce.
* 'shard_map': the step runs per device on its batch shard via `jax.shard_map`, and
  averages gradients explicitly with `lax.pmean` over `data`. Same numbers, and a
  place to hand-tune collectives; replicated parameters and `model` size 1 only
  (vit_jax.sharding.check_sharding says so before compiling).
"""

from typing import Any, Callable

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax.config_checks import is_int
from vit_jax.config_checks import require

# The mesh's axis names: batches (and FSDP shards) over `data`, tensor
# parallelism over `model`. Everything else names them through these.
DATA_AXIS = 'data'
MODEL_AXIS = 'model'
PARALLELISMS = ('jit', 'shard_map')


def check_config(config: Any) -> None:
  """Raises ConfigError for mesh keys that cannot describe a mesh.

  `mesh.data` (-1 or > 0), `mesh.model` (> 0) and `cpu_devices` (>= 0).
  Whether they fit the devices JAX has is `make_mesh`'s check.
  """
  for key in ('data', 'model'):
    value = config.mesh[key]
    require(is_int(value) and (value > 0 or (key == 'data' and value == -1)),
            f'config.mesh.{key} must be a positive integer'
            f'{" or -1 (all remaining devices)" if key == "data" else ""}'
            f', got {value!r}')
  require(is_int(config.mesh.cpu_devices) and config.mesh.cpu_devices >= 0,
          f'config.mesh.cpu_devices must be an integer >= 0, got '
          f'{config.mesh.cpu_devices!r}')


def use_cpu_devices(count: int) -> bool:
  """Runs XLA's CPU backend as `count` devices; 0 keeps JAX's default.

  The step then runs data-parallel over them like over any devices, each
  device executing its ops on its own share of the cores. Small models gain:
  one device's ops are too small for its intra-op threads, and one device per
  core keeps every core busy; large ones do not (docs/benchmarks.md has the
  numbers). Accelerators are unaffected: it sets only the CPU backend.

  JAX reads this when it starts its backends, so it must run before anything
  touches a device; `train.py` calls it first. Called later (a notebook, a
  test), it changes nothing and warns if the running count differs.

  Returns:
    True if the CPU backend will have (or has) `count` devices.
  """
  if count < 0:
    raise ValueError(f'cpu_devices must be >= 0, got {count}')
  if count == 0:
    return True
  try:
    jax.config.update('jax_num_cpu_devices', count)
    return True
  except RuntimeError:  # Backends already started.
    have = len(jax.devices('cpu'))
    if have != count:
      logging.warning('cpu_devices=%d not applied: JAX already runs %d CPU '
                      'devices (set it before any JAX computation, as train.py '
                      'does).', count, have)
    return have == count


def make_mesh(num_devices: int | None = None, *, data: int = -1,
              model: int = 1) -> Mesh:
  """A (`data`, `model`) mesh over the first `num_devices` devices (default all).

  `model` devices form each tensor-parallel group and `data` (-1: all the
  rest) the groups; together they must use every device. `model` is the inner
  axis and must divide a host's device count, so a model group never spans
  hosts and each host feeds whole groups its own batch rows. Axis types are Auto: the
  SPMD partitioner propagates shardings, as `jit` users expect (jax 0.10's
  `make_mesh` default is Explicit).
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f'asked for {num_devices} devices, have {len(devices)}')
    devices = devices[:num_devices]
  count = len(devices)
  if model < 1 or count % model:
    raise ValueError(f'config.mesh.model={model} does not divide the {count} devices')
  if jax.process_count() > 1 and jax.local_device_count() % model:
    raise ValueError(f'config.mesh.model={model} does not divide the '
                     f'{jax.local_device_count()} devices of a host: a model '
                     'group must stay on one host')
  if data == -1:
    data = count // model
  if data * model != count:
    raise ValueError(f'config.mesh data={data} x model={model} is not the '
                     f'{count} devices; set config.mesh.data=-1 to use all of them')
  mesh = jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))
  # make_mesh may reorder devices to follow the physical (TPU) topology.
  if any(len({d.process_index for d in group}) > 1 for group in mesh.devices):
    raise ValueError(f'config.mesh.model={model}: a model group would span '
                     'hosts in this topology; use a smaller model axis')
  return mesh


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, accum_steps: int = 1) -> None:
  """Raises ValueError if the batch cannot be split over devices and micro-batches."""
  num_devices = dict(mesh.shape)[DATA_AXIS]  # Batches are split over `data` only.
  if global_batch % num_devices:
    raise ValueError(
        f'batch_size {global_batch} is not divisible by the {num_devices} devices '
        f"of the mesh's data axis; use a multiple of {num_devices}")
  if global_batch % accum_steps:
    raise ValueError(f'batch_size {global_batch} is not divisible by accum_steps '
                     f'{accum_steps}')
  micro = global_batch // accum_steps
  if micro % num_devices:
    raise ValueError(
        f'micro-batch {micro} (batch_size {global_batch} / accum_steps '
        f'{accum_steps}) is not divisible by the {num_devices} data-axis devices; '
        f'use a batch_size that is a multiple of {num_devices * accum_steps}')


def local_batch_size(global_batch: int) -> int:
  """This process's share of the global batch."""
  if global_batch % jax.process_count():
    raise ValueError(f'batch_size {global_batch} is not divisible by the '
                     f'{jax.process_count()} processes')
  return global_batch // jax.process_count()


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles host-local numpy batches into global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def pmean_if_sharded(tree: Any) -> Any:
  """Mean over the `data` axis inside shard_map."""
  return jax.lax.pmean(tree, DATA_AXIS)


def shard_map_step(step_fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """Runs `step_fn(state, batch)` per device with replicated state.

  `step_fn` sees its device's batch shard and must all-reduce what it needs
  (gradients, metrics) with `pmean_if_sharded`; its outputs must be replicated.
  """
  return jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                       out_specs=P(), check_vma=False)
