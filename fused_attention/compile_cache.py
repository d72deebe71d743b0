"""Keys torch.compile's caches on this package's op schemas, so an upgrade never reuses stale graphs.

torch's FX graph cache and AOTAutograd cache key a graph on its code, which names our custom ops but
not their schemas (still so in torch 2.14; pytorch/pytorch#187319): after an upgrade that changed an
op's schema, a graph compiled against the old schema was reused from the on-disk cache and failed.
Both caches do key on ``torch.compiler.config.cache_key_tag``; :func:`tag_compile_caches` adds one
component to it, ``fused_attention=<version>+<hash of our registered op schemas>``, keeping whatever
the user set. The cost: graphs compiled before an upgrade of this package are compiled once more.
"""

from __future__ import annotations

import hashlib

import torch

from ._version import __version__

NAMESPACE = "fused_attention"
_SEPARATOR = "|"


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
    digest = hashlib.sha256("\n".join(op_schemas()).encode()).hexdigest()[:16]
    return f"{NAMESPACE}={__version__}+{digest}"


def tag_compile_caches() -> None:
    """Puts :func:`cache_tag` into ``torch.compiler.config.cache_key_tag`` (replacing an older one of
    ours, keeping the user's own). Older torch without the setting has no FX graph cache to guard."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    parts = [p for p in config.cache_key_tag.split(_SEPARATOR) if p and not p.startswith(NAMESPACE + "=")]
    config.cache_key_tag = _SEPARATOR.join([*parts, cache_tag()])
