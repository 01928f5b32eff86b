"""Test session set-up: 8 simulated CPU devices, so sharding is really exercised.

XLA_FLAGS must be set before jax initialises its backend, hence here, at import.
Tests that want one device build a 1-device mesh explicitly.
"""

import os
import sys

# The 8 simulated devices meet in every all-reduce; on a loaded 2-core machine one
# device thread can be descheduled for longer than XLA's default 40 s, which
# aborts the whole worker process ("Termination timeout for all reduce").
# Eigen's intra-op thread pool off: with 8 devices and 2 xdist workers on 2
# cores, a train step once wedged with every XLA thread parked on a futex (no
# CPU used, no timeout fired); single-threaded Eigen ops per device avoid that
# known XLA CPU pool wedge and oversubscribe the cores less.
# LLVM at -O0: the suite's tiny models spend far longer compiling than running,
# and unoptimised machine code halves their compile time. XLA's HLO passes
# still run (a ViT's optimised HLO is byte-identical), so the programs compute
# the same thing; train.py and the tools outside the tests keep the default.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
                           ' --xla_cpu_multi_thread_eigen=false'
                           ' --xla_backend_optimization_level=0'
                           ).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The repo root, so tests can import `configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS, which it reads when its backend starts)

# Start the backend now, with the 8 devices. Otherwise the first test of a
# worker that trains a config with `cpu_devices` set (the quickstart's 2) in
# this process would fix the device count for every later test of the worker.
assert len(jax.devices()) == 8, jax.devices()


import fcntl  # noqa: E402
import json  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402


def _shared_dir(tmp_path_factory, name):
  """A directory every pytest-xdist worker of this session sees."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  path = root / name
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session's workers and the
  train.py processes tests start: a program compiled by one test (or worker,
  or subprocess) is loaded, not compiled again, by the next that needs it."""
  cache = _shared_dir(tmp_path_factory, 'jax_cache')
  settings = {'jax_compilation_cache_dir': str(cache),
              'jax_persistent_cache_min_compile_time_secs': 0,
              'jax_persistent_cache_min_entry_size_bytes': -1}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)  # Inherited by subprocesses.


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """tests/tiny.py's `tiny_config` trained for its 8 steps, once per session.

  `.workdir` (checkpoints at steps 4 and 8, metrics.jsonl), `.final` (its final
  metrics) and `.data_dir` (the digits it read). Shared by the workers; a test
  that changes the workdir copies it first.
  """
  from tiny import tiny_config  # pylint: disable=g-import-not-at-top
  from vit_jax import trainer  # pylint: disable=g-import-not-at-top
  root = _shared_dir(tmp_path_factory, 'tiny_run')
  with open(root / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # One worker trains; the other waits.
    if not (root / 'final.json').exists():
      final = trainer.train_and_evaluate(tiny_config(root / 'tfds'),
                                         str(root / 'work'))
      (root / 'final.json').write_text(json.dumps(final))
  return types.SimpleNamespace(
      workdir=str(root / 'work'), data_dir=root / 'tfds',
      final=json.loads((root / 'final.json').read_text()))


def pytest_collection_modifyitems(items):
  """Slow (multi-process, end-to-end) tests first: pytest-xdist hands tests
  out in this order, and a minute-long test started last would leave the
  other worker idle while it finishes."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
