"""Preemption: SIGTERM means "finish this step, save, exit 0".

TPU VMs (and most schedulers) send SIGTERM some seconds before they take a
machine away. `PreemptionWatch` turns it into a question the loop asks after
every step, `reached(step)`; on True the loop saves synchronously and returns,
and rerunning the same command resumes from that step.

All processes of a run must stop at the same step: a checkpoint save is a
collective, and the signal may reach only some hosts. How they agree:

* One process: a Python SIGTERM handler sets a flag; `reached` reads it. No
  communication, so checking every step costs nothing.
* Several processes: JAX's preemption sync service
  (`multihost_utils.reached_preemption_sync_point`, started by
  `jax.distributed.initialize`; Orbax uses the same). Its own SIGTERM handler
  tells the coordination service, which picks the first step every process
  can still reach, and `reached` is True on exactly that step everywhere. The
  check is a local read (the agreement runs in the background), so it too is
  made every step, and no Python handler is installed (it would replace the
  service's). We chose it over an all-reduce of a flag because that would add
  a host sync per step, or per N steps a latency that eats into the grace
  period. If the service is disabled (`jax_enable_preemption_service=False`),
  SIGTERM keeps its default action: the run dies and loses at most one
  checkpoint interval, and a warning says so.
"""

import signal
import threading
import types

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Context manager: while active, SIGTERM asks the loop to save and stop."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, object] = {}
    self._received: int | None = None
    self._multiprocess = jax.process_count() > 1
    self._service_off = False

  def __enter__(self) -> 'PreemptionWatch':
    if self._multiprocess:  # JAX's preemption service handles SIGTERM.
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not the main thread: SIGTERM is not handled; a '
                      'preemption loses up to checkpoint_every steps.')
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self._received is None:
      logging.warning('Received %s: saving after the current step, then exiting.',
                      signal.Signals(signum).name)
    self._received = signum

  def reached(self, step: int) -> bool:
    """True when the run should save at `step` and stop (same on all processes).

    Must be called after every step on every process, with the step just done.
    """
    if not self._multiprocess:
      return self._received is not None
    if self._service_off:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False.
      self._service_off = True
      logging.warning(
          'JAX preemption service is off: SIGTERM will end this multi-process '
          'run without a final checkpoint (up to checkpoint_every steps are '
          'recomputed on restart).')
      return False
