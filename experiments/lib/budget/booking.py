"""A run's ledger bookings: the reservation made (or attached) before any model work, its charges
made as the work ends, and the signals (SIGINT, SIGTERM) held off while a charge, the metrics row it
pays for or a checkpoint is written, so a kill at any moment leaves every finished piece of work
charged once. Used by every script that spends FLOPs (train.py, evaluate.py, forecast.py);
``cli.run_as_script`` ends the process when ``errors.Interrupted`` reaches it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import flops
from experiments.lib import errors
from experiments.lib.errors import Interrupted
from experiments.lib.run.config import RunConfig


class Booking:
    """A run's charges to its ledger reservation, made as the work ends, so a kill loses at most the
    work in flight: training steps (every ``every`` steps, pending in between), evaluations and
    evaluation batches at once. ``reservation`` None (a data-parallel rank other than 0): nothing is charged.

    As a context manager: SIGINT and SIGTERM raise Interrupted, except inside ``held()``, where they
    wait for the block's end (a charge and the metrics row it pays for, a checkpoint: each done
    whole). Leaving the block in any way (the end, an exception, a signal) charges what is pending
    and closes the reservation, releasing what was not spent. Work interrupted in flight was not
    completed and is not charged (after --resume it runs, and is charged, again).

    A charge the ledger cannot write (flops.LedgerWriteError: the disk full, an I/O error) stops the
    run: ``errors.UnrecordedChargeError`` names the FLOPs of finished work the ledger lacks (``unrecorded``).
    Nothing is retried on the way out, so nothing is counted twice; the reservation is still closed if
    the ledger takes that line, and if it does not, the next reservation settles it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, reservation: flops.Reservation | None, *, every: int = 1, step_tokens: int = 0) -> None:
        if every < 1:
            raise ValueError(f"charge every {every} steps: must be at least 1")
        self.reservation, self.every, self.step_tokens = reservation, every, step_tokens
        self.charged = 0.0                   # by this process
        self.unrecorded = 0.0                # finished work whose charge the ledger could not write
        self.pending_steps, self.pending_flops, self.to_step = 0, 0.0, 0
        self.since = time.time()
        self._depth, self._signal, self._previous = 0, None, {}

    def __enter__(self) -> Booking:
        if threading.current_thread() is threading.main_thread():  # (handlers can only be set there)
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        try:
            with self.held():
                in_flight = exc   # (the error that will be reported: the one that stopped the run, or the flush's)
                try:
                    if not self.unrecorded:   # (after a charge that could not be written, nothing is retried)
                        self.flush()
                except errors.UnrecordedChargeError as e:
                    if exc is not None:
                        errors.add_note(e, f"the run had stopped on: {errors.one_line(exc)}")
                    in_flight = e
                    raise
                finally:   # (a refused charge still closes the reservation)
                    if self.reservation and self.reservation.owner:  # (a study's reservation: the study closes it)
                        self._close(in_flight)
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    def _close(self, in_flight: BaseException | None) -> None:
        """Close the reservation. If its line cannot be written either, the error that stopped the run
        (``in_flight``) stays the one reported, with a note that the reservation is left open."""
        try:
            self.reservation.close()
        except flops.LedgerWriteError as e:
            note = f"closing the reservation failed too ({errors.one_line(e)}): the next reservation settles it"
            if in_flight is not None:
                errors.add_note(in_flight, note)
            elif self.unrecorded:
                raise errors.UnrecordedChargeError(f"{self._lost()}; {note}") from e
            else:
                raise

    def _lost(self) -> str:
        return (f"{self.unrecorded:.4e} FLOPs of finished work are not recorded in the ledger "
                f"{self.reservation.ledger.path} (nothing is retried, so nothing is counted twice)")

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._depth:
            self._signal = signum  # raised when the held block ends
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block that SIGINT and SIGTERM do not cut short; they take effect once it is done."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._signal is not None:
                signum, self._signal = self._signal, None
                raise Interrupted(signum)

    def charge(self, amount: float, *, kind: str, tokens: int = 0, steps: int = 0,
               config: dict[str, Any] | None = None) -> None:
        """Charge work that has just ended."""
        if self.reservation is None or not amount:
            return
        with self.held():
            now = time.time()
            try:
                self.reservation.charge(amount, kind=kind, tokens=tokens, steps=steps, seconds=now - self.since,
                                        config=config)
            except flops.LedgerWriteError as e:
                self.unrecorded += amount
                raise errors.UnrecordedChargeError(f"{errors.one_line(e)}: the run stops; {self._lost()}") from e
            self.charged += amount
            self.since = now

    def ensure(self, amount: float, what: str) -> None:
        """Before doing work that will cost ``amount``: refuse it (flops.ReservationExceeded, nothing
        done, what ran already charged) when the reservation cannot pay for it and what is pending."""
        if self.reservation is None or self.reservation.fits(self.pending_flops + amount):
            return
        self.flush()
        raise flops.ReservationExceeded(
            f"{what} would cost {amount:.4e} FLOPs, but reservation {self.reservation.id} ({self.reservation.name}) "
            f"has {self.reservation.left():.4e} left of {self.reservation.planned:.4e}: the run stops before it; "
            f"everything that ran is charged, and --resume continues from the last checkpoint")

    def step(self, amount: float, step: int) -> None:
        """Optimizer step ``step`` is done: charged now, or with the next ``every``-th."""
        self.pending_steps, self.pending_flops, self.to_step = self.pending_steps + 1, self.pending_flops + amount, step
        if self.pending_steps >= self.every:
            self.flush()

    def flush(self) -> None:
        """Charge the pending steps (before every checkpoint, so a checkpoint never holds uncharged work)."""
        if self.pending_steps:
            n, f = self.pending_steps, self.pending_flops
            self.charge(f, kind="train", steps=n, tokens=n * self.step_tokens,
                        config={"from_step": self.to_step - n, "to_step": self.to_step})
            self.pending_steps, self.pending_flops = 0, 0.0


def reserve(cfg: RunConfig, planned: float, *, kind: str, config: dict[str, Any]) -> flops.Reservation:
    """Hold the run's planned FLOPs in the ledger, or refuse it (flops.LedgerError) before any model work.

    With --reservation the FLOPs were reserved by the process that started this run (a study, for all
    its runs at once): this run charges that reservation under its own name and leaves it open."""
    ledger = flops.Ledger(cfg.ledger, budget=cfg.budget)
    try:
        if cfg.reservation:
            reservation = ledger.attach(cfg.reservation)
            reservation.name, reservation.kind = cfg.run_name, kind
            return reservation
        return ledger.reserve(planned, name=cfg.run_name, kind=kind, config=config)
    except (flops.BudgetExceeded, flops.LedgerDamaged) as e:
        raise type(e)(f"refused before any model work: {e}") from None
    except (KeyError, ValueError) as e:  # no such reservation, or it is closed
        raise errors.UsageError(f"--reservation {cfg.reservation}: {errors.one_line(e)}") from None
