"""What a backend is: capabilities as data, reasons as strings.

A backend answers ``not_supported_reasons(inputs)``; an empty list means it can serve the call. The
dispatcher (:mod:`.dispatch`) never guesses: every refusal is a sentence a user can act on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..inputs import AttentionInputs, VarlenInputs

ALL_FEATURES = frozenset(
    {
        "causal",
        "window",
        "alibi",
        "softcap",
        "key_lengths",
        "bool_mask",
        "float_mask",
        "mask_grad",
        "dropout",
        "gqa",
        "lse",
        "value_head_dim",
        "varlen",
        "sinks",
    }
)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. ``device_types`` / ``max_head_dim`` of None mean no limit."""

    device_types: frozenset[str] | None
    dtypes: frozenset[torch.dtype]
    features: frozenset[str] = ALL_FEATURES
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    backward: bool = True
    # (feature, why it is missing) for features left out of ``features``: the refusal says why
    missing_reasons: tuple[tuple[str, str], ...] = ()


# Automatic dispatch decisions by call signature (see ``dispatch.select``). A backend's answer depends on
# its capabilities and its availability, both fixed for the process; setting any attribute of a backend
# (tests replace capabilities and methods) forgets every decision.
decision_cache: dict[tuple, Backend] = {}


_MISSING = object()


def _is_class_value(obj: object, name: str, value: object) -> bool:
    """Whether ``value`` is what ``obj``'s class gives for ``name`` (its attribute, or its method bound
    to ``obj``): what ``monkeypatch`` sets back when it undoes a patch."""
    static = inspect.getattr_static(type(obj), name, _MISSING)
    if static is _MISSING:
        return False
    if isinstance(static, (staticmethod, classmethod)):
        static = static.__func__
    return value is static or (getattr(value, "__self__", None) is obj and getattr(value, "__func__", None) is static)


class ForgetsDecisions:
    """Clears the class's ``decisions`` (remembered automatic choices) whenever an attribute of an
    instance is set or deleted: a patched backend may answer differently."""

    decisions: ClassVar[dict]

    def __setattr__(self, name: str, value: object) -> None:
        if _is_class_value(self, name, value):  # back to the class's own (a patch undone): as built again
            self.__dict__.pop(name, None)
        else:
            super().__setattr__(name, value)
        self.decisions.clear()

    def unpatched(self) -> bool:
        """Whether this instance holds no attributes of its own: none set (a patch undone counts as
        none), so it answers as its class does."""
        return not self.__dict__

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.decisions.clear()


class Backend(ForgetsDecisions):
    """Base class. Subclasses set ``name`` and ``capabilities`` and implement availability and launch."""

    decisions = decision_cache
    name: str = ""
    capabilities: Capabilities = Capabilities(frozenset(), frozenset(), frozenset())

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all on this machine (missing build, package, device), or None."""
        return None

    def device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` beyond its declared device types, or None."""
        return None

    def serves_device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot serve ``device``: undeclared device type, or :meth:`device_reason`."""
        types = self.capabilities.device_types
        if types is not None and device.type not in types:
            return f"device {device.type} not supported (supports {sorted(types)})"
        return self.device_reason(device)

    def not_supported_reasons(self, inputs: AttentionInputs | VarlenInputs) -> list[str]:
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable:
            return [unavailable]
        caps = self.capabilities
        device_reason = self.serves_device_reason(inputs.device)
        if device_reason:
            reasons.append(device_reason)
        if inputs.dtype not in caps.dtypes:
            reasons.append(f"dtype {inputs.dtype} not supported")
        for dim_name, dim in (("head dim", inputs.head_dim), ("value head dim", inputs.value_head_dim)):
            if caps.max_head_dim is not None and dim > caps.max_head_dim:
                reasons.append(f"{dim_name} {dim} > {caps.max_head_dim}")
            if dim % caps.head_dim_multiple:
                reasons.append(f"{dim_name} {dim} is not a multiple of {caps.head_dim_multiple}")
        missing = sorted(inputs.features - caps.features)
        if missing:
            why = dict(caps.missing_reasons)
            reasons.append(
                "features not supported: " + ", ".join(f"{f} ({why[f]})" if f in why else f for f in missing)
            )
        if not caps.backward and requires_grad(inputs):
            reasons.append("backward not supported (an input requires grad)")
        return reasons

    def attention(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out (B, Hq, L, Ev), lse (B, Hq, L))`` for canonical inputs."""
        raise NotImplementedError

    def varlen_attention(self, inputs: VarlenInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out (total_q, H, Dv), lse (H, total_q))``."""
        raise NotImplementedError

    def attention_backward(
        self, inputs: AttentionInputs, dout: torch.Tensor, need_mask_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``(dq, dk, dv, dmask)`` of :meth:`attention` on canonical inputs for the upstream gradient
        ``dout``, computed from the inputs alone (no forward call, nothing saved), or None when this
        backend's backward needs its forward's results. ``dmask`` (the float mask's gradient, in its
        shape) only with ``need_mask_grad``, else None. No dropout, no slope or sink gradients."""
        return None

    def attention_backward_from_stats(
        self, inputs: AttentionInputs, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(dq, dk, dv)`` of a block of a larger softmax (ring attention), FlashAttention's way: each
        row's ``lse`` and ``delta = rowsum(dO * O)`` ``(B, Hq, L)`` of the whole softmax are given, so
        ``P = exp(S - lse)`` and ``dS = P (dP - delta)``; or None where this backend has no such backward.
        No dropout; no sinks (they belong to the whole softmax: its caller's)."""
        return None

    def attention_precise_lse(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(out, lse)`` of :meth:`attention` with ``lse`` in float64 whatever the dtype, accurate to the
        precision of each row's sum rather than to float32's spacing at ``|lse|`` (a same-signed error in
        every ``exp(S - lse)`` of the row, which a merge over key blocks carries into the gradients of
        :meth:`attention_backward_from_stats`); or None. Backends that override that backward override
        this. No dropout, no sinks."""
        return None


def draw_seed(inputs: AttentionInputs | VarlenInputs) -> torch.Tensor | None:
    """A dropout seed from torch's default CPU generator, so ``torch.manual_seed`` reproduces it."""
    if inputs.dropout_p == 0:
        return None
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64)


def dense_op_args(inputs: AttentionInputs, sinks: bool = False) -> tuple:
    """The arguments of a dense attention op with the canonical signature (``ops/attention_rules.py``),
    with a fresh dropout seed; ``sinks``: the op's signature has the sink logits after the seed."""
    return (
        inputs.query, inputs.key, inputs.value, inputs.attn_mask, inputs.key_lengths, inputs.alibi_slopes,
        draw_seed(inputs), *((inputs.sinks,) if sinks else ()), inputs.causal, inputs.window_left,
        inputs.window_right, inputs.softcap, inputs.scale, inputs.dropout_p,
    )


def varlen_op_args(inputs: VarlenInputs, sinks: bool = False) -> tuple:
    """The arguments of a packed attention op with the canonical signature, with a fresh dropout seed."""
    return (
        inputs.query, inputs.key, inputs.value, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.alibi_slopes,
        draw_seed(inputs), *((inputs.sinks,) if sinks else ()), inputs.window_left, inputs.window_right,
        inputs.softcap, inputs.scale, inputs.dropout_p,
    )


def requires_grad(inputs: AttentionInputs | VarlenInputs) -> bool:
    """Whether the call will need a backward: grad mode on and an input (or a float mask) requires grad."""
    if not torch.is_grad_enabled():
        return False
    mask = getattr(inputs, "attn_mask", None)
    return (
        inputs.query.requires_grad or inputs.key.requires_grad or inputs.value.requires_grad
        or (mask is not None and mask.requires_grad) or (inputs.sinks is not None and inputs.sinks.requires_grad)
    )


class OpsBackend(Backend):
    """A backend whose backward, block backward and precise-lse forward are ops of the canonical signatures
    (``ops/attention_rules.py``), registered as ``fused_attention::<ops_prefix>attention_backward``,
    ``<ops_prefix>attention_backward_from_stats`` and ``<ops_prefix>attention_precise_lse`` (the cpu
    extension's and the torch backend's chunked ops)."""

    ops_prefix = ""

    def _op(self, name: str):
        return getattr(torch.ops.fused_attention, self.ops_prefix + name).default

    def attention_backward(
        self, inputs: AttentionInputs, dout: torch.Tensor, need_mask_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if inputs.dropout_p:
            raise ValueError("attention_backward: no dropout (the forward's mask would be needed)")
        dq, dk, dv, dmask, *_ = self._op("attention_backward")(
            dout, *dense_op_args(inputs, sinks=True), need_mask_grad, False, False
        )
        return dq, dk, dv, dmask if need_mask_grad else None

    def attention_backward_from_stats(
        self, inputs: AttentionInputs, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if inputs.dropout_p or inputs.sinks is not None:
            raise ValueError("attention_backward_from_stats: no dropout, no sinks")
        return self._op("attention_backward_from_stats")(
            dout, inputs.query, inputs.key, inputs.value, inputs.attn_mask, inputs.key_lengths,
            inputs.alibi_slopes, lse, delta, inputs.causal, inputs.window_left, inputs.window_right,
            inputs.softcap, inputs.scale,
        )

    def attention_precise_lse(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.dropout_p or inputs.sinks is not None:
            raise ValueError("attention_precise_lse: no dropout, no sinks")
        return self._op("attention_precise_lse")(
            inputs.query, inputs.key, inputs.value, inputs.attn_mask, inputs.key_lengths, inputs.alibi_slopes,
            inputs.causal, inputs.window_left, inputs.window_right, inputs.softcap, inputs.scale,
        )
