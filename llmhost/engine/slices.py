"""Launching a step a layer at a time. A step's forward pass is written as a generator: each `next()` queues one
more slice of its kernels (a decoder layer) and the generator returns the step's result (StopIteration.value).
The host core interleaves an eager prompt step's slices with the other models' decode launches on its one thread
(host/core.py: launched whole, its milliseconds of Python held every other model's next step back); everything
else runs the slices to the end at once (`drain`)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from typing import TypeVar

T = TypeVar("T")

# A launch in slices: yields nothing between slices, returns what the whole launch returns.
Slices = Generator[None, None, T]


def drain(slices: Slices[T]) -> T:
    """Run every slice; the launch's result."""
    while True:
        try:
            next(slices)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def each_in(slices: Slices[T], enter: Callable[[], AbstractContextManager[object]]) -> Slices[T]:
    """`slices` with the context `enter()` makes entered around each slice and left between them: a stream or
    device made current for one step's kernels must not stay current while the caller launches other steps."""
    while True:
        with enter():
            try:
                next(slices)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        yield
