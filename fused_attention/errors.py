"""Exception types for bad arguments.

torch's SDPA raises ``RuntimeError`` for most bad inputs; ours name the offending argument and derive
from both the Python-idiomatic class and ``RuntimeError`` so drop-in callers' ``except`` clauses keep
working.
"""

from __future__ import annotations


class AttentionArgumentError(ValueError, RuntimeError):
    """An argument has a bad value or shape (a ``ValueError`` that is also a ``RuntimeError``)."""


class AttentionTypeError(TypeError, RuntimeError):
    """An argument has a bad type or dtype (a ``TypeError`` that is also a ``RuntimeError``)."""
