"""XLA CPU flags that speed up a precision policy, added when jaxlib knows them.

Some XLA CPU flags make a policy's programs faster (docs/benchmarks.md), but
XLA aborts the whole process, at backend start, on a flag it does not know: a
jaxlib from before the flag existed, or after it was renamed. So each flag is
first tried in a short subprocess (`import jax; jax.devices('cpu')` with only
that flag in XLA_FLAGS), and only a flag that passed is added to XLA_FLAGS.
Each answer is cached per jaxlib version ($XDG_CACHE_HOME/vit_jax/
xla_flags.json), so an install probes a flag once.

XLA reads XLA_FLAGS when JAX starts its backends, so `apply` must run before
anything touches a device; vit_jax/startup.py calls it for train.py and every
tool given a config. A flag the user's XLA_FLAGS already sets keeps the
user's value; `config.xla_auto_flags=False` or VIT_JAX_XLA_AUTO_FLAGS=0 turns
the automatic flags off.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from typing import Any

from absl import logging

from vit_jax.config_checks import ConfigError

# Precision policy (vit_jax/models/precision.py) -> XLA flags it gains from.
# Each candidate was timed on the ViT-S/16 train step (docs/benchmarks.md,
# "XLA CPU flags"); with jaxlib 0.10.2 on the Intel Xeon (AMX) machine none
# beat the defaults: --xla_cpu_use_onednn=true (float32, bfloat16) and
# --xla_cpu_experimental_ynn_fusion_type=+dot / +eltwise / +dot,+eltwise,+reduce
# (mixed_bf16, bfloat16) were equal or slower (+eltwise: 1.2-2.5x slower);
# with jaxlib 0.12.1 neither did prefer_vector_width=512, use_onednn, the
# concurrency-optimized scheduler, tiling propagation, fast math, the new
# xtile lowering or region-analysis copy insertion (docs/benchmarks.md).
# A flag measured to help on a newer jaxlib goes here; the probe keeps it
# from aborting an older one.
AUTO_FLAGS: dict[str, tuple[str, ...]] = {
    'float32': (),
    'mixed_bf16': (),
    'bfloat16': (),
}
CONFIG_KEY = 'xla_auto_flags'
SWITCH_ENV = 'VIT_JAX_XLA_AUTO_FLAGS'
PROBE_TIMEOUT_S = 60
_OFF = ('0', 'false', 'no', 'off')
_FLAG = re.compile(r'--([A-Za-z0-9_]+)(=.*)?')
_NAME_IN_XLA_FLAGS = re.compile(r'(?:^|\s)--?([A-Za-z0-9_]+)')
# The flags `apply` added to XLA_FLAGS in this process: a second call takes
# them out before adding its own, so calls do not pile up.
_APPLIED: list[str] = []


def applied() -> list[str]:
  """The automatic flags this process added to XLA_FLAGS (for the record)."""
  return list(_APPLIED)


def enabled_by_env() -> bool:
  """False when VIT_JAX_XLA_AUTO_FLAGS is 0 / false / no / off."""
  return os.environ.get(SWITCH_ENV, '').strip().lower() not in _OFF


def check_config(config: Any) -> None:
  """Raises ConfigError unless `config.xla_auto_flags` is True or False."""
  value = config.get(CONFIG_KEY, True)
  if not isinstance(value, bool):
    raise ConfigError(f'config.{CONFIG_KEY} must be True or False, got '
                      f'{value!r} ({type(value).__name__})')


def cache_path() -> str:
  """$XDG_CACHE_HOME/vit_jax/xla_flags.json (default ~/.cache/vit_jax/...)."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'vit_jax', 'xla_flags.json')


def known(flag: str) -> bool:
  """Whether the installed jaxlib starts its CPU backend with `flag` set.

  Answered from the cache, else by a subprocess (XLA aborts on an unknown flag
  or a malformed value, so it cannot be tried in this process). A probe that
  cannot tell (timeout, crash) warns, counts as unknown and is not cached.
  """
  return bool(_answer(flag))


def apply(precision: str, enabled: bool = True) -> list[str]:
  """Adds `precision`'s known flags to XLA_FLAGS; returns the ones added.

  Calling it again before JAX starts (another precision, or disabled) first
  takes out what the previous call added, so XLA_FLAGS ends as if only this
  call had run. Nothing is added when disabled (here or by
  VIT_JAX_XLA_AUTO_FLAGS=0), for a flag XLA_FLAGS already names (the user's
  value wins), for one this jaxlib rejects (a warning), or once JAX's
  backends have started (a warning: XLA has read XLA_FLAGS already).

  Raises:
    ValueError: `precision` is not a policy.
  """
  if precision not in AUTO_FLAGS:
    raise ValueError(f'precision {precision!r} is not a policy; choose one of '
                     f'{", ".join(AUTO_FLAGS)}')
  on = enabled and enabled_by_env()
  given = os.environ.get('XLA_FLAGS', '')
  if _backends_started():
    late = [f for f in AUTO_FLAGS[precision] if f not in _APPLIED and
            _flag_name(f) not in _names_in(given)] if on else []
    if late:
      logging.warning('XLA flags %s (precision %r) not applied: JAX has '
                      'started its backends already; apply them before '
                      'anything touches a device (vit_jax.startup.'
                      'prepare_process).', ' '.join(late), precision)
    return []
  env = _without(given, _APPLIED)
  _APPLIED.clear()
  if on:
    users = _names_in(env)
    for flag in AUTO_FLAGS[precision]:
      if _flag_name(flag) in users:
        logging.info('XLA_FLAGS sets --%s itself; not adding %s',
                     _flag_name(flag), flag)
        continue
      answer = _answer(flag)
      if answer:
        _APPLIED.append(flag)
      elif answer is False:  # None: the failed probe has warned already.
        logging.warning('XLA flag %s (precision %r) skipped: jaxlib %s does '
                        'not accept it', flag, precision, _jaxlib_version())
  env = ' '.join([env.strip(), *_APPLIED]).strip()
  if env != given.strip():
    if env:
      os.environ['XLA_FLAGS'] = env
    else:
      os.environ.pop('XLA_FLAGS', None)
  return applied()


# ------------------------------------------------------------- helpers


def _flag_name(flag: str) -> str:
  match = _FLAG.fullmatch(flag)
  if not match:
    raise ValueError(f'XLA flag {flag!r} is not of the form --name=value')
  return match.group(1)


def _names_in(xla_flags: str) -> set[str]:
  """The flag names an XLA_FLAGS string sets ('-name' counts too)."""
  return set(_NAME_IN_XLA_FLAGS.findall(xla_flags))


def _without(xla_flags: str, flags: list[str]) -> str:
  """`xla_flags` less each of `flags` (whole words); the rest untouched."""
  for flag in flags:
    xla_flags = re.sub(rf'(?:^|\s){re.escape(flag)}(?=\s|$)', '', xla_flags,
                       count=1)
  return xla_flags


def _answer(flag: str) -> bool | None:
  """`known`, with None for a probe that could not tell (not cached)."""
  _flag_name(flag)  # A malformed flag is a ValueError, not a probe.
  path = cache_path()
  cache = _read_cache(path)
  key = f'jaxlib {_jaxlib_version()} {flag}'
  if key not in cache:
    answer = _probe(flag)
    if answer is None:
      return None
    cache[key] = answer
    _write_cache(path, cache)
  return cache[key]


def _backends_started() -> bool:
  """Whether JAX has started its backends, found without starting them."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  if callable(started):
    return bool(started())
  return bool(getattr(xla_bridge, '_backends', None))


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__


def _probe(flag: str) -> bool | None:
  """Starts JAX's CPU backend in a subprocess with only `flag`; None: unsure.

  A non-zero exit whose output names the flag is XLA refusing it (unknown, or
  a value it cannot parse); any other failure says nothing about the flag.
  """
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS='cpu')
  try:
    done = subprocess.run(
        [sys.executable, '-c', "import jax; jax.devices('cpu')"], env=env,
        capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    logging.warning('XLA flag %s skipped: its probe took over %d s',
                    flag, PROBE_TIMEOUT_S)
    return None
  except OSError as e:
    logging.warning('XLA flag %s skipped: its probe did not start: %s', flag, e)
    return None
  if done.returncode == 0:
    return True
  output = (done.stderr or '') + (done.stdout or '')
  if done.returncode > 0 and _flag_name(flag) in output:
    return False
  last = output.strip().splitlines()[-1:] or ['(no output)']
  logging.warning('XLA flag %s skipped: its probe exited %d: %s', flag,
                  done.returncode, last[0])
  return None


def _read_cache(path: str) -> dict[str, bool]:
  """The cached answers; an unreadable or malformed file counts as empty."""
  try:
    with open(path, encoding='utf-8') as f:
      cache = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    logging.info('Ignoring the XLA flag cache %s: %s', path, e)
    return {}
  if not isinstance(cache, dict):
    logging.info('Ignoring the XLA flag cache %s: not a JSON object', path)
    return {}
  return {k: v for k, v in cache.items() if isinstance(v, bool)}


def _write_cache(path: str, cache: dict[str, bool]) -> None:
  """Replaces the cache file whole (concurrent processes never see half of
  one); a cache that cannot be written only means probing again next time."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    logging.info('XLA flag cache %s not written: %s', path, e)
