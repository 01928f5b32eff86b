"""The error every check of a config, workdir or input raises.

One class, so that each entry point can tell a refusal (print what to change,
no traceback) from a bug, whichever module found the problem.
"""


class ConfigError(ValueError):
  """A config value that cannot work; the message says which key and why."""
