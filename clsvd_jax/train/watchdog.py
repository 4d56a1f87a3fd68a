"""Runs never hang silently, and a killed run says where it was.

``Watchdog``: the runner reports progress (``beat``) at every task boundary, every optimizer step it dispatches,
every fetch of metrics and every checkpoint. When the watched phase makes no progress for ``timeout`` seconds
(``training.watchdog_seconds``), a thread prints what was running and the last checkpoint, then stops the run:

1. it raises ``RunStalled`` in the main thread (through a signal, which also ends a blocking sleep or wait that
   returns to Python), so the run unwinds normally: files are closed, nothing half-written is kept;
2. if the main thread does not unwind within ``grace`` seconds (it is stuck in native code, e.g. a device or a
   thread pool that never answers), it ends the process with status ``EXIT_STALLED``. Everything saved before
   (checkpoints, ``config.yaml``) is complete on disk: ``--resume`` continues from the last checkpoint.

Evaluation and the preparation of data are not watched (``pause``): they report no progress of their own and
their length grows with the size of the data.

``stop_on_sigterm``: SIGTERM (a scheduler's kill, a preemption notice) raises ``RunTerminated`` naming the phase
and the last checkpoint, instead of ending the process without a word.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

EXIT_STALLED = 5
# The signal that carries the stall to the main thread: rarely used by anything else in a training process.
_STALL_SIGNAL = signal.SIGALRM


class RunStalled(RuntimeError):
  """A phase made no progress for ``training.watchdog_seconds``; the message names it and the last checkpoint."""


class RunTerminated(RuntimeError):
  """The process got SIGTERM; the message names the phase and the last checkpoint."""


class Watchdog:
  """Stops a run whose watched phase makes no progress for ``timeout`` seconds (see the module docstring).

  Args:
    timeout: seconds without a ``beat``; 0 or None disables the watchdog.
    last_checkpoint: describes the last checkpoint for the message (called from the watchdog's thread).
    grace: seconds the main thread gets to unwind before the process is ended.
    exit_fn: ends the process (``os._exit``; replaceable in tests).
  """

  def __init__(self, timeout: float | None, last_checkpoint: Callable[[], str], *, grace: float = 30.0,
               exit_fn: Callable[[int], None] = os._exit):
    self.timeout = float(timeout or 0.0)
    self.grace = grace
    self._last_checkpoint = last_checkpoint
    self._exit = exit_fn
    self.phase = "starting"
    self._last = time.monotonic()
    self._paused = 0
    self._stop = threading.Event()
    self._acknowledged = threading.Event()
    self._thread: threading.Thread | None = None
    self._old_handler = None
    self.message: str | None = None

  # -- progress ------------------------------------------------------------------------------------------------

  def beat(self, phase: str | None = None) -> None:
    """Progress: resets the clock (and names what runs now)."""
    if phase is not None:
      self.phase = phase
    self._last = time.monotonic()

  @contextlib.contextmanager
  def pause(self, phase: str) -> Iterator[None]:
    """A phase the watchdog does not time (evaluation); the clock restarts when it ends."""
    self.beat(phase)
    self._paused += 1
    try:
      yield
    finally:
      self._paused -= 1
      self.beat()

  def where(self) -> str:
    """``<phase>; <last checkpoint>`` for messages."""
    return f"{self.phase}; {self._last_checkpoint()}"

  # -- the thread ----------------------------------------------------------------------------------------------

  def __enter__(self) -> Watchdog:
    self.beat()
    if self.timeout <= 0:
      return self
    if threading.current_thread() is threading.main_thread():
      self._old_handler = signal.signal(_STALL_SIGNAL, self._raise_in_main)
    self._thread = threading.Thread(target=self._watch, name="clsvd-watchdog", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc: object) -> None:
    self._acknowledged.set()
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5.0)
      self._thread = None
    if self._old_handler is not None:
      signal.signal(_STALL_SIGNAL, self._old_handler)
      self._old_handler = None

  def _raise_in_main(self, signum: int, frame: object) -> None:
    del signum, frame
    if self.message is not None:
      raise RunStalled(self.message)

  def _watch(self) -> None:
    poll = min(1.0, self.timeout / 4)
    while not self._stop.wait(poll):
      idle = time.monotonic() - self._last
      if self._paused or idle < self.timeout:
        continue
      self.message = (f"no progress for {idle:.0f} s (training.watchdog_seconds={self.timeout:g}) in "
                      f"{self.where()}. If this phase is just slow, raise training.watchdog_seconds; then "
                      "continue with --resume")
      print(f"clsvd: watchdog: {self.message}", file=sys.stderr, flush=True)
      if self._old_handler is not None:
        signal.pthread_kill(threading.main_thread().ident, _STALL_SIGNAL)
      if self._acknowledged.wait(self.grace):
        return
      print(f"clsvd: watchdog: the process did not stop within {self.grace:g} s (stuck in native code); ending it "
            f"with status {EXIT_STALLED}", file=sys.stderr, flush=True)
      self._exit(EXIT_STALLED)
      return


@contextlib.contextmanager
def stop_on_sigterm(where: Callable[[], str]) -> Iterator[None]:
  """Within the block, SIGTERM raises ``RunTerminated`` with ``where()`` in its message (main thread only;
  elsewhere the block runs unchanged)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum: int, frame: object) -> None:
    del signum, frame
    raise RunTerminated(f"stopped by SIGTERM during {where()}; continue with --resume")

  old = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)
