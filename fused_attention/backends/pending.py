"""Backends whose attention kernels land in later issues: registered now, so dispatch explains them."""

from __future__ import annotations

from .base import Backend


class PendingBackend(Backend):
    """A named backend that cannot serve attention yet; its reason says which work brings it."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason


CUDA = PendingBackend("cuda", "CUDA attention is not built yet (the CUDA extension holds the positional-encoding kernels)")
