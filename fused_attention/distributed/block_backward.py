"""The gradient of one block of a ring through the *global* softmax, with one backward call per block.

Where the backend has FlashAttention's backward interface
(:meth:`~fused_attention.backends.base.Backend.attention_backward_from_stats`: the ``cpu`` and ``torch``
backends), the block's call takes the global ``lse`` and ``D = rowsum(dO * out)`` and nothing else is
needed (:func:`stats_backend`). Elsewhere (``triton``), the method below.

The ring's output is ``out = sum_b exp(lse_b - lse) o_b`` over key blocks ``b`` (``lse``: the global
log-sum-exp, sinks included). A block's exact gradients need ``dS = P (dP - D)`` with the global
``P = exp(S - lse)``, ``dP = dO V^T`` and ``D = rowsum(dO * out)``. FlashAttention-style rings pass
``lse`` and ``D`` to the kernel's backward. A backward that recomputes its own softmax and its own
``delta = sum_j p dp`` from the inputs alone (:meth:`~fused_attention.backends.base.Backend.attention_backward`;
triton's) needs the call's inputs shaped so that its own arithmetic yields the global ``dS``:

- every score of row ``i`` is shifted by ``-lse_i`` (a float mask ``(B, H, Lq, 1)``, added after scale,
  softcap and ALiBi, as the global lse was) and the call gets a sink of logit 0 in every head; the
  kernel's probabilities are then ``p = gamma P`` with ``gamma = 1 / (1 + beta)``,
  ``beta = exp(lse_b - lse) <= 1``, and the sink's is ``gamma`` (the shifted scores never exceed the
  sink's 0, so the kernel's exps are FlashAttention's ``exp(S - lse)``);
- values gain a column of ones and the upstream gradient becomes ``[c dO, t]`` with ``c = 1 + beta``:
  the kernel's ``dp = c dP + t`` and ``delta = rho + t (1 - gamma)``, where
  ``rho = beta rowsum(dO * o_b)`` is the block's share of ``D``, so its
  ``dS = p (dp - delta) = P (dP - gamma rho + gamma^2 t)``, which ``t = c (rho - c D)`` makes exactly
  ``P (dP - D)``; its ``dV`` is ``p^T c dO = P^T dO``. ``c`` lies in [1, 2] and ``|t|`` is bounded by
  a few times ``|rho| + |D|``, so nothing is ill-conditioned.

ALiBi slopes' gradient: not from here (the kernel's float-mask gradient is ``dS``, but its roundings
times global distances are too coarse in float32); :mod:`.slope_grad` sums it in float64.

``rho`` needs the block's own output ``o_b``, which a kernel that recomputes ``delta`` cannot supply:
the forward keeps every block's ``(o_b, lse_b)`` for the backward (one output-sized tensor per ring
step). A backward taking the global ``lse`` and ``D`` would need neither the stored outputs nor the
extra column.
"""

from __future__ import annotations

import torch

from ..backends.base import Backend
from ..backends.dispatch import forced_backend_name, get_backend, select
from ..backends.torch_backend import TORCH
from ..inputs import canonicalize
from .blocks import Block, Rules, block_mask
from .merge import accumulation_dtype


def _backend(rules: Rules, inputs) -> Backend:
    forced = forced_backend_name(rules.backend)
    return get_backend(forced) if forced else select(inputs)


def stats_backend(rules: Rules, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the blocks' backward takes the global statistics (the backend that serves these shards
    overrides ``attention_backward_from_stats``): then the forward keeps no block outputs and the values
    travel without their ones column."""
    inputs = canonicalize(q, k, v, None, 0.0, False, rules.scale, rules.enable_gqa, softcap=rules.softcap or None)
    backend = _backend(rules, inputs)
    overrides = type(backend).attention_backward_from_stats is not Backend.attention_backward_from_stats
    return overrides and not backend.not_supported_reasons(inputs)


def _stats_inputs(rules: Rules, block: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The block's call (rows and keys cut out) for a backend that takes the global statistics."""
    rows, cols = slice(block.q0, block.q1), slice(block.k0, block.k1)
    mask = block_mask(rules, block, q.device, accumulation_dtype(q.dtype)) if block.form == "mask" else None
    kwargs = {"window_size": (-1, block.window_right)} if block.form == "band" else {}
    inputs = canonicalize(
        q[:, :, rows], k[:, :, cols], v[:, :, cols], mask, 0.0, False, rules.scale, rules.enable_gqa,
        softcap=rules.softcap or None, **kwargs,
    )
    return inputs, _backend(rules, inputs)


def block_forward_for_stats(
    rules: Rules, block: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the block's rows ``q0:q1`` against keys ``k0:k1`` of the shard, from
    :meth:`~fused_attention.backends.base.Backend.attention_precise_lse`: scores rounded as the backward
    rounds them, lse in float64 (merged in float64), so that :func:`block_backward_from_stats`'s
    ``exp(S - lse)`` sums to 1 over each row's keys (the public call's decode path for a few rows rounds
    its products differently: float32 gradients missed the policy by up to 4.5x at scale 6)."""
    inputs, backend = _stats_inputs(rules, block, q, k, v)
    result = backend.attention_precise_lse(inputs)
    assert result is not None, "stats_backend chose a backend with this forward"
    return result


def block_backward_from_stats(
    rules: Rules, block: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
    lse: torch.Tensor, delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the block's rows and keys from one backward call given the global ``lse``
    (float64: :func:`block_forward_for_stats`) and ``delta`` (:func:`stats_backend` said the backend has
    it); ``v`` the plain values."""
    rows = slice(block.q0, block.q1)
    inputs, backend = _stats_inputs(rules, block, q, k, v)
    grads = backend.attention_backward_from_stats(inputs, dout[:, :, rows], lse[:, :, rows], delta[:, :, rows])
    assert grads is not None, "stats_backend chose a backend with this backward"
    return grads


def with_ones_column(v: torch.Tensor) -> torch.Tensor:
    """``v (B, H, S, Ev)`` -> ``(B, H, S, Ev + 1)`` with a last column of ones (the rows' ``t`` term)."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def block_backward(
    rules: Rules,
    block: Block,
    q: torch.Tensor,
    k: torch.Tensor,
    v_ones: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the block's rows ``q0:q1`` and keys ``k0:k1`` through the global softmax.

    ``k``, ``v_ones`` (values with their ones column) are the whole key shard; ``dout``, ``lse`` and
    ``delta = rowsum(dO * out)`` are the local queries' (global ``lse``); ``block_out``/``block_lse``
    are what the forward's call on this block returned.
    """
    rows, cols = slice(block.q0, block.q1), slice(block.k0, block.k1)
    cd = accumulation_dtype(q.dtype)
    lse_g = lse[:, :, rows]
    seen = torch.isfinite(lse_g)  # a row that sees nothing anywhere has no gradient: c = 1, t = 0
    lse_g = torch.where(seen, lse_g, 0)
    beta = torch.exp(block_lse.to(cd) - lse_g)  # 0 where the block saw nothing (lse_b = -inf)
    c = 1 + beta
    do = dout[:, :, rows]
    rho = beta * (do.to(cd) * block_out.to(cd)).sum(-1)
    upstream = do.new_empty(*do.shape[:-1], do.shape[-1] + 1)  # [c dO, t], written in place
    torch.mul(do, c.unsqueeze(-1), out=upstream[..., :-1])
    upstream[..., -1] = torch.where(seen, c * (rho - c * delta[:, :, rows]), 0)
    del rho
    mask_dtype = cd if cd == torch.float64 else torch.float32
    shift = (-lse_g).to(mask_dtype).unsqueeze(-1)  # (B, H, Lq, 1)
    kwargs: dict = {}
    if block.form == "mask":
        bias = block_mask(rules, block, q.device, mask_dtype)
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=mask_dtype, device=q.device).masked_fill_(~bias, -torch.inf)
        shift = shift + bias
    elif block.form == "band":
        kwargs["window_size"] = (-1, block.window_right)
    inputs = canonicalize(
        q[:, :, rows], k[:, :, cols], v_ones[:, :, cols], shift, 0.0, False, rules.scale, rules.enable_gqa,
        softcap=rules.softcap or None, sinks=torch.zeros(q.shape[1], dtype=torch.float32, device=q.device),
        **kwargs,
    )
    backend = _backend(rules, inputs)
    # A backend whose backward needs its own forward (triton), or that cannot take this call (the
    # extra value column), leaves it to the chunked math of the torch backend.
    grads = None if backend.not_supported_reasons(inputs) else backend.attention_backward(inputs, upstream, False)
    if grads is None:
        grads = TORCH.attention_backward(inputs, upstream, False)
    dq, dk, dv, _ = grads
    return dq, dk, dv[..., :-1]
