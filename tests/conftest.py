"""Test session set-up: 8 simulated CPU devices, so sharding is really exercised.

XLA_FLAGS must be set before jax initialises its backend, hence here, at import.
Tests that want one device build a 1-device mesh explicitly.
"""

import os
import sys

# The 8 simulated devices meet in every all-reduce; on a loaded 2-core machine one
# device thread can be descheduled for longer than XLA's default 40 s, which
# aborts the whole worker process ("Termination timeout for all reduce").
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
                           ).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The repo root, so tests can import `configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
