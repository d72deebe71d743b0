"""Backends and the dispatcher that chooses among them."""

from .base import ALL_FEATURES, Backend, Capabilities
from .dispatch import BACKENDS, explain, get_backend, priority, select

__all__ = ["ALL_FEATURES", "BACKENDS", "Backend", "Capabilities", "explain", "get_backend", "priority", "select"]
