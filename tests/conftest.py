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
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
                           ' --xla_cpu_multi_thread_eigen=false'
                           ).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The repo root, so tests can import `configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS, which it reads when its backend starts)

# Start the backend now, with the 8 devices. Otherwise the first test of a
# worker that trains a config with `cpu_devices` set (the quickstart's 2) in
# this process would fix the device count for every later test of the worker.
assert len(jax.devices()) == 8, jax.devices()
