"""Named sweeps for ``python -m fused_attention bench``; flags given on the command line override a
preset's values. ``dtype`` None means the device's default (float32 on the CPU, bfloat16 on CUDA)."""

from __future__ import annotations

from .spec import ATTENTION_OPS, MODES, OPS

PRESETS: dict[str, dict[str, object]] = {
    # Under a minute on a 2-core CPU: plain, causal and ALiBi at two lengths, both training modes;
    # providers that are slow to warm up (FlexAttention's compile, interpreted Triton) are left out.
    "quick": {
        "ops": ["plain", "causal", "alibi"],
        "seq": [256, 512],
        "batch": [1],
        "heads": [4],
        "dim": [64],
        "modes": ["fwd", "fwd+bwd"],
        "min_run_time": 0.05,
        "quick": True,
    },
    # Every attention op at three lengths, forward and forward+backward.
    "default": {
        "ops": list(ATTENTION_OPS),
        "seq": [512, 1024, 2048],
        "batch": [1],
        "heads": [8],
        "dim": [64],
        "modes": ["fwd", "fwd+bwd"],
        "min_run_time": 0.2,
    },
    # Every op (attention and position kernels), every mode, two head dims, lengths to 4k.
    "full": {
        "ops": list(OPS),
        "seq": [512, 1024, 2048, 4096],
        "batch": [1],
        "heads": [8],
        "dim": [64, 128],
        "modes": list(MODES),
        "min_run_time": 0.2,
    },
    # A decode step (one query per sequence, GQA 32/8, head dim 128) against caches of 4k to 32k keys,
    # contiguous and paged (page 16): GB/s of K and V read, against the measured copy bandwidth.
    "decode": {
        "ops": ["decode"],
        "seq": [4096, 16384, 32768],
        "batch": [1],
        "heads": [32],
        "dim": [128],
        "modes": ["fwd"],
        "min_run_time": 0.2,
    },
    # FlashAttention's published sweep: 16k tokens per batch (batch = 16384 // seq), hidden 2048
    # (heads = 2048 // head dim), head dims 64 and 128, causal and not, lengths 512 .. 16k.
    "flash": {
        "ops": ["plain", "causal"],
        "seq": [512, 1024, 2048, 4096, 8192, 16384],
        "tokens": 16384,
        "hidden": 2048,
        "batch": [1],
        "heads": [1],
        "dim": [64, 128],
        "modes": list(MODES),
        "min_run_time": 0.2,
    },
}
