"""XLA flags per precision policy: probed in a subprocess (an unknown flag
would abort this process), cached per jaxlib, added to XLA_FLAGS before JAX
starts unless the user sets the flag, the config or the env turns them off, or
it is too late."""

import json
import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from vit_jax import startup
from vit_jax import xla_flags
from vit_jax.config_checks import ConfigError
from vit_jax.models import precision

from tiny import ROOT

# Accepted by every jaxlib this project supports (tests/conftest.py sets it).
KNOWN = '--xla_cpu_multi_thread_eigen=false'
UNKNOWN = '--xla_cpu_no_such_flag=true'
BASE = '--xla_force_host_platform_device_count=8'


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
  """An empty cache, the switch unset, nothing applied yet in this process."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.delenv(xla_flags.SWITCH_ENV, raising=False)
  monkeypatch.setattr(xla_flags, '_APPLIED', [])


class FakeProbes:
  """Stands in for subprocess.run: XLA accepts only `accepted`; counts runs."""

  def __init__(self, accepted=()):
    self.accepted, self.flags = set(accepted), []

  def __call__(self, argv, env, **kwargs):
    del kwargs
    flag = env['XLA_FLAGS']
    self.flags.append(flag)
    if flag in self.accepted:
      return subprocess.CompletedProcess(argv, 0, '', '')
    return subprocess.CompletedProcess(
        argv, 1, '', f'F parse_flags_from_env.cc] Unknown flag in XLA_FLAGS: {flag}')


@pytest.fixture
def before_start(monkeypatch):
  """As at the start of a run: backends not started, XLA_FLAGS = BASE, and a
  policy table of made-up flags that fake probes answer."""
  monkeypatch.setattr(xla_flags, '_backends_started', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', BASE)
  monkeypatch.setattr(xla_flags, 'AUTO_FLAGS', {
      'float32': (), 'mixed_bf16': ('--xla_good=1', '--xla_bad=1'),
      'bfloat16': ('--xla_good=2',)})
  probes = FakeProbes(accepted={'--xla_good=1', '--xla_good=2'})
  monkeypatch.setattr(subprocess, 'run', probes)
  return probes


def _cached(flag):
  with open(xla_flags.cache_path()) as f:
    return {k.rsplit(' ', 1)[1]: v for k, v in json.load(f).items()}.get(flag)


def test_the_table_has_one_entry_per_precision_policy():
  assert sorted(xla_flags.AUTO_FLAGS) == sorted(precision.POLICIES)


def test_a_known_flag_is_probed_once_then_read_from_the_cache(monkeypatch):
  assert xla_flags.known(KNOWN)  # A real subprocess.
  assert _cached(KNOWN) is True
  probes = FakeProbes()
  monkeypatch.setattr(subprocess, 'run', probes)
  assert xla_flags.known(KNOWN)
  assert not probes.flags


def test_an_unknown_flag_is_unknown_and_this_process_lives():
  assert not xla_flags.known(UNKNOWN)  # XLA aborted the probe, not us.
  assert _cached(UNKNOWN) is False


def test_apply_adds_known_flags_and_skips_unknown_ones_with_a_warning(
    before_start, caplog):
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert xla_flags.apply('mixed_bf16') == ['--xla_good=1']
  assert os.environ['XLA_FLAGS'] == f'{BASE} --xla_good=1'
  assert xla_flags.applied() == ['--xla_good=1']
  assert '--xla_bad=1' in caplog.text
  assert before_start.flags == ['--xla_good=1', '--xla_bad=1']


def test_calling_apply_again_replaces_what_it_added(before_start):
  xla_flags.apply('mixed_bf16')
  assert xla_flags.apply('mixed_bf16') == ['--xla_good=1']
  assert os.environ['XLA_FLAGS'] == f'{BASE} --xla_good=1'  # Not twice.
  assert xla_flags.apply('bfloat16') == ['--xla_good=2']
  assert os.environ['XLA_FLAGS'] == f'{BASE} --xla_good=2'
  assert xla_flags.apply('float32') == []
  assert os.environ['XLA_FLAGS'] == BASE
  assert xla_flags.applied() == []
  assert len(before_start.flags) == 3  # Each flag probed once, then cached.


def test_the_users_own_value_of_a_flag_wins(before_start, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', f'{BASE} --xla_good=7')
  assert xla_flags.apply('bfloat16') == []
  assert os.environ['XLA_FLAGS'] == f'{BASE} --xla_good=7'
  assert not before_start.flags  # Not even probed.


def test_disabled_by_config_or_by_env_adds_nothing(before_start, monkeypatch):
  assert xla_flags.apply('bfloat16', enabled=False) == []
  monkeypatch.setenv(xla_flags.SWITCH_ENV, '0')
  assert xla_flags.apply('bfloat16', enabled=True) == []
  assert os.environ['XLA_FLAGS'] == BASE
  assert not before_start.flags


def test_prepare_process_applies_the_configs_policy_and_its_switch(
    before_start):
  config = common.get_config()
  config.model.precision = 'bfloat16'
  startup.prepare_process(config)
  assert os.environ['XLA_FLAGS'] == f'{BASE} --xla_good=2'
  config.xla_auto_flags = False
  startup.prepare_process(config)
  assert os.environ['XLA_FLAGS'] == BASE


def test_a_non_bool_switch_or_an_unknown_precision_is_a_config_error(
    before_start):
  config = ml_collections.ConfigDict({
      'xla_auto_flags': 'yes', 'model': {'name': 'ViT-Ti_16'},
      'mesh': {'cpu_devices': 0}})
  with pytest.raises(ConfigError, match=r'config\.xla_auto_flags .*yes'):
    startup.prepare_process(config)
  config = common.get_config()
  config.model.precision = 'float16'
  with pytest.raises(ConfigError, match=r"config\.model\.precision 'float16'"):
    startup.prepare_process(config)
  with pytest.raises(ValueError, match='--name=value'):
    xla_flags.known('xla_good=1')


def test_a_corrupt_cache_file_is_ignored_and_rewritten(before_start):
  os.makedirs(os.path.dirname(xla_flags.cache_path()))
  with open(xla_flags.cache_path(), 'w') as f:
    f.write('{"jaxlib')
  assert xla_flags.known('--xla_good=1')
  assert _cached('--xla_good=1') is True


def test_a_probe_that_times_out_skips_the_flag_and_is_not_cached(
    before_start, monkeypatch, caplog):

  def timeout(argv, **kwargs):
    raise subprocess.TimeoutExpired(argv, kwargs['timeout'])

  monkeypatch.setattr(subprocess, 'run', timeout)
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert xla_flags.apply('bfloat16') == []
  assert '--xla_good=2 skipped: its probe took over' in caplog.text
  assert os.environ['XLA_FLAGS'] == BASE
  assert not os.path.exists(xla_flags.cache_path())
  monkeypatch.setattr(subprocess, 'run', before_start)
  assert xla_flags.known('--xla_good=2')  # Probed again, now answered.


def test_after_the_backends_started_nothing_is_applied_and_it_warns(
    monkeypatch, caplog):
  # conftest.py started them; the real check must see that.
  monkeypatch.setattr(xla_flags, 'AUTO_FLAGS', dict(
      xla_flags.AUTO_FLAGS, mixed_bf16=('--xla_good=1',)))
  probes = FakeProbes()
  monkeypatch.setattr(subprocess, 'run', probes)
  before = os.environ.get('XLA_FLAGS')
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert xla_flags.apply('mixed_bf16') == []
  assert 'not applied' in caplog.text and 'started its backends' in caplog.text
  assert os.environ.get('XLA_FLAGS') == before
  assert not probes.flags


# A real flag every jaxlib here knows and that changes no numerics, standing in
# for the policy's table (which may be empty: docs/benchmarks.md).
_STAND_IN = '--xla_cpu_multi_thread_eigen=false'
_SCRIPT = """
import os
from configs import common
from vit_jax import startup
from vit_jax import xla_flags
xla_flags.AUTO_FLAGS[{precision!r}] = ({flag!r},)
config = common.get_config()
config.model.precision = {precision!r}
startup.prepare_process(config)
import jax
jax.devices()
print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))
"""


@pytest.mark.slow
@pytest.mark.parametrize('switch', ['1', '0'])
def test_a_fresh_process_starts_jax_with_the_policys_known_flags(switch):
  policy = 'mixed_bf16'
  # The same (tmp) cache as this process's probes above.
  env = dict(os.environ, **{xla_flags.SWITCH_ENV: switch})
  env.pop('XLA_FLAGS', None)
  done = subprocess.run(
      [sys.executable, '-c', _SCRIPT.format(precision=policy, flag=_STAND_IN)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  line = [l for l in done.stdout.splitlines() if l.startswith('XLA_FLAGS=')][0]
  present = line.split('=', 1)[1].split()
  assert (_STAND_IN in present) == (switch == '1'), line
