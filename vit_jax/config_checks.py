"""The error every config check raises, and the small checks they share.

Each setting is checked by the module that reads it (optim.py the optimizer
keys, data/ the input keys, ...); those checks raise `ConfigError`, so an
entry point can tell a refusal (print what to change, no traceback) from a
bug, whichever module found the problem. The helpers below keep the messages
alike: they name the key as a user writes it (`config.schedule.base_lr`).
"""

import math
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
  """A config value that cannot work; the message says which key and why."""


def require(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless `ok`."""
  if not ok:
    raise ConfigError(message)


def is_number(value: Any) -> bool:
  """An int or float, not a bool (which Python counts as an int)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, key: str) -> None:
  require(is_int(value) and value > 0,
          f'config.{key} must be a positive integer, got {value!r}')


def number(value: Any, key: str) -> None:
  require(is_number(value), f'config.{key} must be a number, got {value!r} '
          f'({type(value).__name__})')


def finite_positive(value: Any, key: str) -> None:
  require(is_number(value) and math.isfinite(value) and value > 0,
          f'config.{key} must be a positive number, got {value}')


def one_of(value: Any, choices: Sequence[Any], key: str) -> None:
  require(value in choices, f'config.{key} {value!r} not in {tuple(choices)}')
