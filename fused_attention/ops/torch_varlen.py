"""Custom ops for packed (varlen) attention in the ``torch`` backend.

Each sequence of the pack is a canonical ``(1, H, len, D)`` view handed to the chunked math; the loop
over sequences lives inside the op, so ``torch.compile`` sees one node and no data-dependent shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..argument_checks import check_cu_values
from ..errors import AttentionArgumentError
from ..kernels import chunked
from . import attention_rules


def _sequences(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int):
    # checked here as well: under torch.compile the values reach the op unchecked
    cq = check_cu_values("cu_seqlens_q", cu_q.tolist(), total_q)
    ck = check_cu_values("cu_seqlens_k", cu_k.tolist(), total_k)
    if len(cq) != len(ck):
        raise AttentionArgumentError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cq)} and {len(ck)}")
    for b in range(len(cq) - 1):
        yield b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])


def _as_dense(t: Tensor, rows: slice) -> Tensor:
    """Packed ``(total, H, D)`` rows -> a ``(1, H, len, D)`` view."""
    return t[rows].transpose(0, 1).unsqueeze(0)


def _slopes(alibi: Tensor | None, b: int) -> Tensor | None:
    if alibi is None:
        return None
    return alibi if alibi.shape[0] == 1 else alibi[b : b + 1]


def torch_varlen_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi: Tensor | None,
    seed: Tensor | None,
    sinks: Tensor | None,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Packed attention: ``out (total_q, H, Dv)``, ``lse (H, total_q)``; windows are bottom-right per sequence."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=chunked.compute_dtype(q.dtype))
    for b, rows, cols in _sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        rules = chunked.rules_from_op(False, window_left, window_right, softcap, scale, dropout_p, seed, stream=b)
        o, s = chunked.attention_forward(
            _as_dense(q, rows), _as_dense(k, cols), _as_dense(v, cols), None, None, _slopes(alibi, b), rules, sinks
        )
        out[rows] = o[0].transpose(0, 1)
        lse[:, rows] = s[0]
    return out, lse


torch_varlen = torch.library.custom_op("fused_attention::torch_varlen", mutates_args=())(
    torch_varlen_impl
)
torch_varlen.register_fake(attention_rules.varlen_fake)


@torch.library.custom_op("fused_attention::torch_varlen_backward", mutates_args=())
def torch_varlen_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi: Tensor | None,
    seed: Tensor | None,
    sinks: Tensor | None,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
    need_alibi_grad: bool,
    need_sinks_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dalibi, dsinks)``; dalibi/dsinks are empty unless asked for."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dalibi = torch.zeros_like(alibi) if need_alibi_grad else q.new_empty(0)
    dsinks = torch.zeros_like(sinks) if need_sinks_grad else q.new_empty(0)
    for b, rows, cols in _sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        rules = chunked.rules_from_op(False, window_left, window_right, softcap, scale, dropout_p, seed, stream=b)
        slopes = _slopes(alibi, b)
        grads = chunked.attention_backward(
            _as_dense(dout, rows), _as_dense(q, rows), _as_dense(k, cols), _as_dense(v, cols),
            None, None, slopes, rules, False, need_alibi_grad, sinks, need_sinks_grad,
        )
        for grad, target, index in ((grads[0], dq, rows), (grads[1], dk, cols), (grads[2], dv, cols)):
            target[index] = grad[0].transpose(0, 1)
        if need_alibi_grad:
            dalibi[b if alibi.shape[0] > 1 else 0] += grads[4][0]
        if need_sinks_grad:
            dsinks += grads[5]
    return dq, dk, dv, dalibi, dsinks


torch_varlen_backward.register_fake(attention_rules.varlen_sinks_backward_fake)
attention_rules.register_varlen_autograd(torch_varlen, torch_varlen_backward, sinks=True)
