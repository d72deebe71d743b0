"""Keys torch.compile's caches on this package's op schemas and op rules, so an upgrade does not reuse
stale graphs.

torch's FX graph cache and AOTAutograd cache key a graph on its code, which names our custom ops but
not their schemas (still so in torch 2.14; pytorch/pytorch#187319): after an upgrade that changed an
op's schema, a graph compiled against the old schema was reused from the on-disk cache and failed.
Both caches do key on ``torch.compiler.config.cache_key_tag``; :func:`tag_compile_caches` adds one
component to it, ``fused_attention=<version>+<hash of our registered op schemas and op rules>``,
keeping whatever the user set. The cost: graphs compiled before an upgrade of this package are compiled
once more.

The fake (meta) and autograd rules are hashed by their source files (:data:`RULE_SOURCES`): fakes
decide the shapes and strides a compiled graph records for our ops' outputs (Inductor asserts them at
run time), autograd rules are traced into compiled backward graphs. After the change to outputs in the
query's layout (2026-12-07), a graph compiled against the previous fake was reused from Inductor's disk
cache between two development builds of one version, and failed. An install without readable sources
(a zipapp, a frozen application) keys on the version and schemas alone.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from ._version import __version__

NAMESPACE = "fused_attention"
_SEPARATOR = "|"
_PACKAGE = Path(__file__).resolve().parent
# Every module that registers a fake or autograd rule of our ops, and what the fakes call to lay out
# their outputs (tests/test_compile_cache.py checks that each file registering one is listed; a new
# helper module that a rule calls must be added by hand).
RULE_SOURCES = (
    "_extension.py",
    "kernels/layout.py",
    "ops/attention_rules.py",
    "ops/kvcache_append.py",
    "ops/position_rules.py",
    "ops/torch_attention.py",
    "ops/torch_varlen.py",
    "ops/triton_attention.py",
    "ops/triton_positional.py",
)


def _read_source(relative: str) -> bytes:
    try:
        return (_PACKAGE / relative).read_bytes()
    except OSError:  # an install without sources: the version and schemas still key the caches
        return b"(unreadable)"


@functools.cache
def rules_digest() -> str:
    """A hash of :data:`RULE_SOURCES` (read once per process)."""
    digest = hashlib.sha256()
    for relative in RULE_SOURCES:
        digest.update(relative.encode() + b"\0" + _read_source(relative) + b"\0")
    return digest.hexdigest()


def op_schemas() -> list[str]:
    """The schema of every op registered so far under ``torch.ops.fused_attention``, sorted."""
    prefix = NAMESPACE + "::"
    names = sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)})
    schemas = []
    for name in names:
        packet = getattr(torch.ops.fused_attention, name[len(prefix) :])
        schemas.extend(str(getattr(packet, overload)._schema) for overload in sorted(packet.overloads()))
    return schemas


def cache_tag() -> str:
    """This package's component of the compile caches' key tag."""
    digest = hashlib.sha256("\n".join([*op_schemas(), rules_digest()]).encode()).hexdigest()[:16]
    return f"{NAMESPACE}={__version__}+{digest}"


def tag_compile_caches() -> None:
    """Puts :func:`cache_tag` into ``torch.compiler.config.cache_key_tag`` (replacing an older one of
    ours, keeping the user's own). Older torch without the setting has no FX graph cache to guard."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    parts = [p for p in config.cache_key_tag.split(_SEPARATOR) if p and not p.startswith(NAMESPACE + "=")]
    config.cache_key_tag = _SEPARATOR.join([*parts, cache_tag()])
