"""Progress events of long work: the generator protocol every long job follows.

A job is a generator that yields ``{"stage": str, "fraction": float}`` events and *returns* its
result. :func:`drain` runs one to the end; :func:`relay` re-yields a sub-job's events mapped into
a part of the caller's progress (the one relay loop: auto size passes, tiles, stack planes). No
imports beyond the standard library."""

from __future__ import annotations

from typing import Generator

__all__ = ["drain", "relay", "relay_map"]


def drain(gen: Generator):
    """Run a progress generator to completion and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def relay_map(gen: Generator, transform):
    """THE relay loop: re-yield ``transform(event)`` for each of ``gen``'s events; return its value."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        yield transform(event)


def relay(gen: Generator, prefix: str = "", start: float = 0.0, span: float = 1.0, cap: float = 1.0):
    """``yield from gen`` with each event's stage prefixed and its fraction mapped to
    ``start + span * fraction`` (at most ``cap``); returns ``gen``'s value."""
    return (yield from relay_map(gen, lambda event: {
        **event, "stage": f"{prefix}{event.get('stage', '')}",
        "fraction": min(cap, start + span * float(event.get("fraction", 0.0)))}))
