"""Progress lines for long loops: a smoothed steps/s and ETA, and durations as people read them."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StepTimer:
  """The progress line's steps/s (over the steps since the last line) and its ETA for the rest of the stage.

  The ETA divides the steps left by a smoothed rate: an exponential moving average of the seconds per step, so
  one slow interval (a checkpoint write, the machine busy for a moment) moves it a little, not tenfold. The
  first interval holds the step's compile and is left out of the average (its line says 'ETA --'), and so is
  the time an evaluation takes (`restart` after it): before, the line after each evaluation of `demo_long` read
  '0.27 steps/s  ETA 2h02m' in a stage that had 7 minutes left.
  """

  def __init__(self, step: int, total_steps: int, *, smoothing: float = 0.3, clock=time.perf_counter):
    self.total_steps, self.smoothing, self.clock = total_steps, smoothing, clock
    self.seconds_per_step: float | None = None  # the smoothed figure; None until an interval without a compile
    self._compiling = True
    self.restart(step)

  def restart(self, step: int) -> None:
    """Starts the next interval at `step` now, leaving out whatever happened since the last `tick`."""
    self._step, self._time = step, self.clock()

  def tick(self, step: int) -> tuple[float, float | None]:
    """Closes the interval at `step`: (steps/s over it, seconds left in the stage or None while unknown)."""
    now, steps = self.clock(), step - self._step
    seconds = max(now - self._time, 1e-9) / max(steps, 1)
    if steps > 0 and self._compiling:
      self._compiling = False
    elif steps > 0:
      previous = self.seconds_per_step
      self.seconds_per_step = seconds if previous is None else previous + self.smoothing * (seconds - previous)
    self.restart(step)
    eta = None if self.seconds_per_step is None else (self.total_steps - step) * self.seconds_per_step
    return 1.0 / seconds, eta
