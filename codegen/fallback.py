"""Kernel forms that may not compile for every GPU or launch shape.

A :class:`FormFallback` runs a preferred form of a launch (TMA descriptors, a fused kernel) and,
where it raises, the plain form that still works; the launch key is remembered, so the failure is
logged once and later launches of that key go straight to the plain form.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import TypeVar

from attncompiler.failures import failure_text

log = logging.getLogger(__name__)

T = TypeVar("T")


class FormFallback:
    """The launch keys whose preferred form raised; ``instead`` says, in the log, what runs in its place."""

    def __init__(self, instead: str):
        self.instead = instead
        self.failed: set[Hashable] = set()

    def run(self, key: Hashable, preferred: Callable[[], T], plain: Callable[[], T], what: str, *args) -> T:
        """``preferred()``, or ``plain()`` where it raised for ``key`` now or before; the first failure is
        logged as ``what % args`` (the form that failed) with the error's type and first line."""
        if key not in self.failed:
            try:
                return preferred()
            except Exception as e:  # a form that does not compile here: the plain form still works
                self.failed.add(key)
                log.warning(f"attncompiler: {what} failed (%s); {self.instead}", *args, failure_text(e))
        return plain()
