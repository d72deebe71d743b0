"""The test tolerance policy of DESIGN.md (FlashAttention's), shared by the self-checks and the tests.

With ``ref64`` the reference in float64 and ``ref_dt`` the reference with every intermediate in the
tested dtype, a result passes when ``max|out - ref64| <= factor * max|ref_dt - ref64| + 1e-6``, with
factor 2 for outputs and 3 for gradients.
"""

from __future__ import annotations

import torch

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
_ABSOLUTE_SLACK = 1e-6


def within_tolerance(
    out: torch.Tensor, ref_dt: torch.Tensor, ref64: torch.Tensor, factor: float
) -> tuple[bool, float, float]:
    """DESIGN.md's policy: ``(ok, err, bound)`` with ``err = max|out - ref64|`` and
    ``bound = factor * max|ref_dt - ref64| + 1e-6``. Equal entries (matching infinities, such as the
    ``-inf`` lse of a row that sees no key) count as error 0; a NaN never passes."""
    ref64 = ref64.detach().cpu().double()

    def max_diff(t: torch.Tensor) -> float:
        t = t.detach().cpu().double()
        if t.shape != ref64.shape:
            raise ValueError(f"shape {tuple(t.shape)} does not match the reference {tuple(ref64.shape)}")
        if t.numel() == 0:
            return 0.0
        diff = torch.where(t == ref64, 0.0, (t - ref64).abs())
        return float(diff.max())

    err = max_diff(out)
    bound = factor * max_diff(ref_dt) + _ABSOLUTE_SLACK
    return err <= bound, err, bound  # NaN compares False
