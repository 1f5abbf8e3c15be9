"""A progress bar for step-limited runs: one bar over the whole run (``trainer.max_steps``), with speed and ETA.

Lightning's bars count batches of the current epoch and start over every epoch, which says nothing about a
run limited by ``max_steps`` (here ~35 batches an epoch for 200k steps). :class:`StepProgressBar` counts
global steps instead, and when ``trainer.max_time`` will end the run first, its total and ETA say so.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from ncsn.app.lightning_private import attached_trainer


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LineWriter:
    """A file for tqdm that writes each redraw of the bar as one whole line (tqdm redraws in place with ``\\r``,
    which in a log file makes one endless line), dropping blank redraws and repeats of the previous line.
    No ``encoding`` attribute: tqdm then draws the bar in ASCII, safe in any log."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = ""

    def write(self, s: str) -> None:
        for part in s.replace("\r", "\n").split("\n"):
            part = part.rstrip()
            if part and part != self._last:
                self._stream.write(part + "\n")
                self._last = part

    def flush(self) -> None:
        self._stream.flush()


def time_limited_total(step: int, initial: int, elapsed: float, time_left: float | None,
                       max_steps: int) -> int | None:
    """The step at which ``max_time`` will stop the run, when that comes before ``max_steps``, else None.

    ``step - initial`` steps took ``elapsed`` seconds (this process's rate); ``time_left`` is the Timer's
    ``max_time`` minus the time elapsed (None without ``max_time``). The run reaches ``max_steps`` in
    ``(max_steps - step) / rate`` seconds; if ``time_left`` is shorter, it stops near ``step + rate * time_left``.
    """
    if time_left is None or elapsed <= 0 or step <= initial:
        return None  # no max_time, or no rate yet
    rate = (step - initial) / elapsed
    if (max_steps - step) / rate <= time_left:
        return None
    return min(max_steps, step + int(rate * max(time_left, 0.0)))


class _StepTqdm(Tqdm):
    """Lightning's Tqdm whose time remaining can be set from outside: ``remaining_s`` (None: tqdm's own,
    (total - n) / rate)."""

    remaining_s: float | None = None

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        if self.remaining_s is not None:
            d["remaining"] = self.format_interval(max(self.remaining_s, 0.0))  # overrides tqdm's estimate
        return d


class StepProgressBar(TQDMProgressBar):
    """A tqdm progress bar whose training bar, when ``trainer.max_steps > 0``, counts global steps over the
    whole run: total ``max_steps``, starting at the current ``global_step`` on resume, never reset at an epoch
    boundary, with steps/s and the time remaining. Without ``max_steps`` it is Lightning's ``TQDMProgressBar``.

    Metrics are read (``get_metrics``: ``.item()`` on logged tensors, a host/GPU sync) only when the bar is
    redrawn: every ``refresh_rate`` global steps, at the last step and after validation — not every step.

    With ``trainer.max_time`` (Lightning's ``Timer`` callback: the source of truth for the time left), the time
    remaining is ``min(steps left / rate, max_time - time elapsed)``. When ``max_time`` comes first, the bar's
    total becomes the step the run will stop at, at the current rate, and the description says
    ``stops at max_time 11:30`` (after the run: ``stopped at max_time 11:30, max_steps 4600``).

    When stdout is not a terminal (``nohup``, output redirected to a file) the bar is written as plain lines,
    at most one every ``log_interval_s`` seconds (plus the last), and the validation bars are not drawn.

    Args:
        refresh_rate: redraw every this many global steps (0 turns the bar off).
        process_position: as for ``TQDMProgressBar``.
        leave: as for ``TQDMProgressBar`` (only used without ``max_steps``: the step bar is one bar per run).
        log_interval_s: seconds between two lines when stdout is not a terminal.
        metrics: names read from ``trainer.callback_metrics`` at a redraw and shown besides the
            ``prog_bar=True`` metrics. Lightning converts every ``prog_bar=True`` metric with ``.item()`` at
            every step, whatever the progress bar does; a metric logged without ``prog_bar`` and listed here is
            converted at redraws only.
        interactive: draw for a terminal (True) or write lines (False); None: whether stdout is a terminal.
    """

    def __init__(
        self,
        refresh_rate: int = 10,
        process_position: int = 0,
        leave: bool = False,
        log_interval_s: float = 60.0,
        metrics: Sequence[str] = ("train/loss",),
        interactive: bool | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.log_interval_s = float(log_interval_s)
        self.metrics = list(metrics)
        self._interactive_setting = interactive
        self._shown_step = -1
        self._last_draw = -math.inf
        self._time_note = ""  # ", stops at max_time ..." when max_time ends the run before max_steps
        self._final = False  # the last line (after the run) is drawn

    # ------------------------------------------------------------------ helpers

    @property
    def interactive(self) -> bool:
        return _is_tty(sys.stdout) if self._interactive_setting is None else self._interactive_setting

    def _by_step(self) -> bool:
        trainer = attached_trainer(self)
        return trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0

    def _file(self) -> Any:
        return sys.stdout if self.interactive else _LineWriter(sys.stdout)

    def _step_description(self) -> str:
        return f"Training (epoch {self.trainer.current_epoch}{self._time_note})"

    def _time_left(self) -> tuple[Timer | None, float | None]:
        """Lightning's Timer (there is one when ``max_time`` is set) and its time remaining, in seconds."""
        timer = next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None)
        left = timer.time_remaining() if timer is not None else None
        return (timer, left) if left is not None else (None, None)

    def _stopped_by_max_time(self, trainer) -> bool:
        _, left = self._time_left()
        return left is not None and left <= 0 and trainer.global_step < trainer.max_steps

    def _apply_time_limit(self, trainer, bar: _StepTqdm, step: int, final: bool = False) -> None:
        """Total, ETA and description of the bar: ``max_steps`` and tqdm's ETA, or, when ``max_time`` ends the
        run first, the step it will stop at, the Timer's time remaining and a note that says so."""
        timer, left = self._time_left()
        if final:  # after the run
            total = step if self._stopped_by_max_time(trainer) else None
            note = f", stopped at max_time {{}}, max_steps {trainer.max_steps}"
        else:
            total = time_limited_total(step, bar.initial, bar.format_dict["elapsed"], left, trainer.max_steps)
            note = ", stops at max_time {}"
        bar.total = trainer.max_steps if total is None else total
        bar.remaining_s = None if total is None else max(left, 0.0)
        max_time = None if timer is None else Tqdm.format_interval(round(timer.time_elapsed() + left))
        self._time_note = "" if total is None else note.format(max_time)
        bar.set_description(self._step_description(), refresh=False)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version (a W&B run id): nothing to watch on a progress bar
        if self.metrics:
            callback_metrics = trainer.callback_metrics
            for name in self.metrics:
                value = callback_metrics.get(name)
                if name not in items and value is not None and getattr(value, "numel", lambda: 1)() == 1:
                    items[name] = float(value)
        return items

    def _draw(self, trainer, pl_module, step: int, final: bool = False) -> None:
        bar = self.train_progress_bar
        bar.n = step
        if isinstance(bar, _StepTqdm):
            self._apply_time_limit(trainer, bar, step, final)
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()
        self._shown_step = step
        self._last_draw = time.monotonic()
        self._final = final

    # ------------------------------------------------------------------ bars

    def init_train_tqdm(self) -> Tqdm:
        if not self._by_step():
            return super().init_train_tqdm()
        self._time_note = ""
        return _StepTqdm(
            desc=self._step_description(),
            total=self.trainer.max_steps,
            initial=self.trainer.global_step,
            unit="step",
            position=(2 * self.process_position),
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=self._file(),
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def init_sanity_tqdm(self) -> Tqdm:
        if self._by_step() and not self.interactive:
            return Tqdm(disable=True)
        return super().init_sanity_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        if self._by_step() and not self.interactive:
            return Tqdm(disable=True)
        return super().init_validation_tqdm()

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._shown_step = trainer.global_step
        self._last_draw = time.monotonic()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._by_step():
            return super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(self._step_description(), refresh=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_step():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self._train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or self.is_disabled or step == self._shown_step:
            return
        out_of_time = self._stopped_by_max_time(trainer)  # the Timer ends the run after this step
        last = step >= trainer.max_steps or out_of_time
        if not last and step % self.refresh_rate != 0:
            return
        if not last and not self.interactive and time.monotonic() - self._last_draw < self.log_interval_s:
            return
        self._draw(trainer, pl_module, step, final=out_of_time)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._by_step():
            super().on_train_epoch_end(trainer, pl_module)
        # by step: nothing to do; the bar carries on, and its metrics are refreshed at the next redraw

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._by_step() or self.interactive:
            return super().on_validation_end(trainer, pl_module)
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if self._train_progress_bar is not None and trainer.state.fn == "fit" and not self.is_disabled:
            # new val metrics go on the next line, not on a line of their own after every validation
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        bar = self._train_progress_bar
        if self._by_step() and bar is not None and not bar.disable and not self.is_disabled and (
                self._shown_step != trainer.global_step or self._stopped_by_max_time(trainer) and not self._final):
            # stopped early (max_time, interrupted, ...) and not drawn yet: the last line says where and why
            self._draw(trainer, pl_module, trainer.global_step, final=True)
        if self._by_step() and bar is not None and not self.interactive:
            bar.leave = False  # closing would write the last line again (a new elapsed time, the same step)
        super().on_train_end(trainer, pl_module)
