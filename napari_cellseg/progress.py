"""Progress events of long work: the generator protocol every long job follows.

A job is a generator that yields ``{"stage": str, "fraction": float}`` events and *returns* its
result. :func:`drain` runs one to the end; :func:`relay` re-yields a sub-job's events mapped into
a part of the caller's progress (the one relay loop: auto size passes, tiles, stack planes). No
imports beyond the standard library."""

from __future__ import annotations

from typing import Generator

__all__ = ["drain", "relay"]


def drain(gen: Generator):
    """Run a progress generator to completion and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def relay(gen: Generator, prefix: str = "", start: float = 0.0, span: float = 1.0, cap: float = 1.0):
    """``yield from gen`` with each event's stage prefixed and its fraction mapped to
    ``start + span * fraction`` (at most ``cap``); returns ``gen``'s value."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        fraction = min(cap, start + span * float(event.get("fraction", 0.0)))
        yield {**event, "stage": f"{prefix}{event.get('stage', '')}", "fraction": fraction}
