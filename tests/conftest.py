"""Test session set-up: 8 simulated CPU devices, so sharding is really exercised.

XLA_FLAGS must be set before jax initialises its backend, hence here, at import.
Tests that want one device build a 1-device mesh explicitly.
"""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The repo root, so tests can import `configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
