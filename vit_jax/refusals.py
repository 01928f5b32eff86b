"""How every entry point refuses bad input: one `error:` line, one exit code.

train.py and each tool end a refused config, file or input the same way: a
single line `error: <what, which key or file, what to do>` on stderr and exit
code 1; a malformed command line (an unknown flag, a value of the wrong type)
gets `usage error:` and exit code 2. No traceback and no flag help: the
message is the whole story, and the help is one `--help` away. `--verbose`
(or VIT_JAX_VERBOSE=1) lets the exception propagate with its traceback, for a
bug report or when a message is not enough.

What counts as a refusal is `USER_ERRORS`; anything else is a bug and keeps
its traceback. Config files that are missing or do not parse are found before
absl parses them (ml_collections would defer the first and bury the second in
importlib frames), so the message names the file and the line.

In a multi-process run every process checks the same things; where one
refuses (a file missing on one host), `agreed_by_all_processes` makes every
process refuse at the same point, so none is left waiting in a collective.
"""

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import flags
import numpy as np

from vit_jax import config_keys
from vit_jax.config_checks import ConfigError

VERBOSE_FLAG = '--verbose'
VERBOSE_ENV = 'VIT_JAX_VERBOSE'
# What a user can get wrong (ConfigError is a ValueError).
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError, PermissionError, ImportError)
_MESSAGE_BYTES = 1024  # Of a refusal shared with the other processes.


class UsageError(Exception):
  """A malformed command line: exit code 2."""


def verbose_requested(argv: Sequence[str]) -> bool:
  """--verbose on the command line, or VIT_JAX_VERBOSE set to other than 0."""
  return (VERBOSE_FLAG in argv[1:] or
          os.environ.get(VERBOSE_ENV, '0') not in ('', '0', 'false', 'False'))


def without_verbose(argv: Sequence[str]) -> list[str]:
  """`argv` less --verbose, which is read here, not by absl."""
  return [a for i, a in enumerate(argv) if i == 0 or a != VERBOSE_FLAG]


def message(error: BaseException) -> str:
  """The one line (or few) a refusal prints: the exception's own text."""
  text = str(error).strip()
  if isinstance(error, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1]  # KeyError's str() quotes its argument.
  return text or type(error).__name__


def print_refusal(error: BaseException) -> int:
  """Prints `error: ...` (or `usage error: ...`); returns the exit code."""
  if isinstance(error, UsageError):
    print(f'usage error: {message(error)}\nTry --help.', file=sys.stderr)
    return 2
  print(f'error: {message(error)}', file=sys.stderr)
  return 1


# ------------------------------------------------------------- config files


def _config_file_arg(argv: Sequence[str], flag: str = 'config') -> str | None:
  """The path of the last --config=PATH[:arg] (or `--config PATH`) in
  `argv`: the one absl keeps."""
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag}='):
      path = arg.split('=', 1)[1].split(':', 1)[0]
    elif arg == f'--{flag}' and i + 1 < len(argv):
      path = argv[i + 1].split(':', 1)[0]
  return path


def check_config_file(argv: Sequence[str]) -> None:
  """Raises ConfigError if --config names a missing or unparsable file.

  Only compiles the file (no code of it runs); what `get_config()` does
  when called is the config's own business and keeps its traceback.
  """
  path = _config_file_arg(argv)
  if path is None:
    return
  if not os.path.exists(path):
    raise ConfigError(f'--config={path}: no such file (configs/ holds the '
                      'shipped ones, e.g. --config=configs/quickstart.py)')
  if os.path.isdir(path):
    raise ConfigError(f'--config={path} is a directory, not a config file')
  try:
    with open(path, 'rb') as f:
      compile(f.read(), path, 'exec')
  except SyntaxError as e:
    where = f'{path}, line {e.lineno}' if e.lineno else path
    raise ConfigError(f'config file {where}: {e.msg}'
                      + (f': {e.text.strip()}' if e.text else '')) from None
  except (OSError, ValueError) as e:
    raise ConfigError(f'config file {path} cannot be read: {e}') from None


def _override_named_in(error: BaseException, argv: Sequence[str]) -> str | None:
  """The --config.KEY override whose key the error names, if one does."""
  text = str(error)
  for arg in argv[1:]:
    match = re.match(r'--config\.([\w.]+)', arg)
    if match and any(f"'{part}'" in text or f'"{part}"' in text
                     for part in match.group(1).split('.')):
      return arg.split('=', 1)[0]
  return None


def parse_flags(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """Parses `argv` into `fv`; returns the rest. Refusals raise, not print.

  Raises:
    ConfigError: a moved or unknown config key, a missing or unparsable
      config file (exit code 1).
    UsageError: an unknown flag or a flag value of the wrong type (exit 2).
  """
  argv = without_verbose(argv)
  config_keys.check_flags(argv)  # A moved key, named before parsing.
  check_config_file(argv)
  try:
    rest = fv(argv)
  except flags.Error as e:
    if str(e).startswith('flag --config='):  # get_config(arg) refused its arg.
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      raise ConfigError(f'--config={_config_file_arg(argv)}: {lines[-1]}'
                        ) from None
    raise UsageError(str(e)) from None
  except (KeyError, AttributeError) as e:  # A misspelt --config.KEY.
    flag = _override_named_in(e, argv)
    if flag is None:
      raise
    guess = re.search(r'Did you mean "([\w.]+)"', str(e))
    raise ConfigError(f'{flag}: no such config key' + (
        f'; did you mean "{guess.group(1)}"?' if guess else
        ' (docs/configs.md lists them)')) from None
  if 'config' in fv and fv['config'].present:
    try:
      fv.config.get('dataset')  # ml_collections defers a load failure to here.
    except OSError as e:
      raise ConfigError(f'--config: {message(e)}') from None
  return rest


def absl_flags_parser(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=...)` for train.py's global flags.

  Prints a refusal and exits with its code; --verbose re-raises instead.
  """
  try:
    return parse_flags(flags.FLAGS, argv)
  except (UsageError, *USER_ERRORS) as e:
    if verbose_requested(argv):
      raise
    sys.exit(print_refusal(e))


def run_refusing(fn: Callable[[], Any], argv: Sequence[str]) -> int:
  """Runs `fn()`; a refusal prints its line and returns 1 (or 2), else 0."""
  try:
    fn()
  except (UsageError, *USER_ERRORS) as e:
    if verbose_requested(argv):
      raise
    return print_refusal(e)
  return 0


# ---------------------------------------------------------- many processes


@contextlib.contextmanager
def agreed_by_all_processes() -> Iterator[None]:
  """Makes a refusal on any process a refusal on every process.

  Wrap the checks a run makes before its first collective. Each process
  shares whether (and why) it refused; one that passed raises a ConfigError
  naming the process that refused and its message, so every process exits
  with the same code instead of waiting for the refused one in a barrier.
  A single-process run just runs the block. Only refusals (USER_ERRORS)
  are shared: a bug on one process (another exception) still leaves the
  others to JAX's distributed runtime, which ends them when it times out.
  """
  import jax  # pylint: disable=g-import-not-at-top  (after distributed init)
  if jax.process_count() == 1:
    yield
    return
  try:
    yield
  except USER_ERRORS as e:
    _share_refusals(message(e))
    raise
  refused = _share_refusals(None)
  if refused:
    index, text = refused[0]
    raise ConfigError(f'process {index} refused the run: {text}')


def _share_refusals(text: str | None) -> list[tuple[int, str]]:
  """(process index, message) of every process that refused."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  row = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  if text is not None:
    encoded = text.encode('utf-8', 'replace')[:_MESSAGE_BYTES]
    row[0] = 1
    row[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(row))
  return [(i, bytes(r[1:]).rstrip(b'\0').decode('utf-8', 'replace'))
          for i, r in enumerate(rows) if r[0]]
