"""What the Triton attention kernels are launched with: one :class:`Problem` for dense and packed calls.

A problem turns tensors into the kernels' shared arguments (pointers, strides, sizes, scalar options)
and compile-time flags (the features a call uses, padded head dims, the matmul precision), so every
pass, and the ahead-of-time compile test, builds exactly the specializations dispatch launches.

Layouts: dense ``q (B, Hq, L, E)``, ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)``, ``lse (B, Hq, L)``;
packed ``q (total_q, Hq, E)``, ``k``/``v`` ``(total_k, Hkv, .)``, ``lse (Hq, total_q)`` with
``cu_seqlens``. Any strides: a packed tensor is a dense one with batch stride 0 whose rows start at
``cu_seqlens[b]``. Size-1 (broadcast) dims of the mask and the ALiBi slopes are read with stride 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import GRID_YZ_MAX, device_guard
from . import attention_configs as configs

_MIN_BLOCK_D = 16  # tl.dot needs K >= 16


def window_within(window: int, reach: int) -> int:
    """A window side (-1: unbounded) no wider than ``reach``, the longest distance a call can span: the
    kernels add it to int32 positions, where a caller's ``2**31 - 1`` would wrap around."""
    return window if window < 0 else min(window, reach)


def _next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` without its wrapper (~1.5 us a call, four calls per launch)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_head_dim(dim: int) -> int:
    return max(_MIN_BLOCK_D, _next_power_of_2(dim))


def _broadcast_strides(t: torch.Tensor) -> list[int]:
    return [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]


def dot_precision(dtype: torch.dtype) -> str:
    """float32 matmuls follow torch's TF32 switch (IEEE by default); 16-bit inputs use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_QKV_STRIDES = tuple(f"stride_{n}" for n in ("qb", "qh", "qm", "qd", "kb", "kh", "kn", "kd", "vb", "vh", "vn", "vd"))
_MASK_STRIDES = ("stride_mb", "stride_mh", "stride_mm", "stride_mn")
_ALIBI_STRIDES = ("stride_ab", "stride_ah")
_OUT_STRIDES = ("stride_ob", "stride_oh", "stride_om", "stride_od")
_LSE_STRIDES = ("stride_lb", "stride_lh", "stride_lm")


@dataclass(frozen=True)
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    key_lengths: torch.Tensor | None
    alibi: torch.Tensor | None  # (1 or B, Hq)
    cu_seqlens_q: torch.Tensor | None  # packed (varlen) when given
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    scale: float
    dropout_p: float
    seed: int
    sinks: torch.Tensor | None = None  # (Hq,) float32 sink logits: the forward and the dQ pass take them

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[-2] if self.varlen else self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[-2] if self.varlen else self.k.shape[1]

    def rows(self, t: torch.Tensor) -> list[int]:
        """(batch, head, row, feature) strides of a q/k/v-like tensor."""
        if self.varlen:
            return [0, t.stride(1), t.stride(0), t.stride(2)]
        return list(t.stride())

    def row_stats(self, t: torch.Tensor) -> list[int]:
        """(batch, head, row) strides of an lse-like tensor."""
        if self.varlen:
            return [0, t.stride(0), t.stride(1)]
        return list(t.stride())

    def block_d(self) -> int:
        return max(padded_head_dim(self.q.shape[-1]), padded_head_dim(self.v.shape[-1]))

    def shared_args(self) -> dict[str, Any]:
        """Arguments every pass takes, runtime values and compile-time flags alike. (Built from constant key
        tuples, with each property read once: on a small call this dict was half the host side.)"""
        q, k, v, mask, alibi = self.q, self.k, self.v, self.mask, self.alibi
        mask_kind = 0
        if mask is not None:
            mask_kind = 1 if mask.dtype == torch.bool else 2
            if mask_kind == 1:
                mask = mask.view(torch.uint8)  # same bytes; Triton loads bytes, not i1
        heads, seq_q, seq_k, varlen = self.heads, self.max_seqlen_q, self.max_seqlen_k, self.varlen
        head_dim, value_head_dim = q.shape[-1], v.shape[-1]
        args = dict(zip(_QKV_STRIDES, (*self.rows(q), *self.rows(k), *self.rows(v))))
        args.update(zip(_MASK_STRIDES, _broadcast_strides(mask) if mask is not None else (0, 0, 0, 0)))
        args.update(zip(_ALIBI_STRIDES, _broadcast_strides(alibi) if alibi is not None else (0, 0)))
        args.update({
            "Q": q, "K": k, "V": v, "Mask": mask, "KeyLengths": self.key_lengths,
            "Alibi": alibi, "CuQ": self.cu_seqlens_q, "CuK": self.cu_seqlens_k,
            "n_heads": heads, "groups": heads // self.kv_heads,
            "seq_q": seq_q, "seq_k": seq_k,
            "head_dim": head_dim, "value_head_dim": value_head_dim,
            "scale": self.scale, "softcap": self.softcap,
            "window_left": window_within(self.window_left, seq_q + seq_k),
            "window_right": window_within(self.window_right, seq_q + seq_k),
            "dropout_p": self.dropout_p, "seed": self.seed,
            # the autotuner's shape bucket: powers of two of the lengths
            "tune_key": _next_power_of_2(seq_q) * (1 << 24) + _next_power_of_2(seq_k),
            "BLOCK_D": padded_head_dim(head_dim), "BLOCK_DV": padded_head_dim(value_head_dim),
            "CAUSAL": self.causal, "WINDOW_LEFT": self.window_left >= 0, "WINDOW_RIGHT": self.window_right >= 0,
            "SOFTCAP": self.softcap > 0, "ALIBI": alibi is not None, "MASK": mask_kind,
            "KEY_LENGTHS": self.key_lengths is not None, "DROPOUT": self.dropout_p > 0,
            "VARLEN": varlen, "FLAT_GRID": self.flat_grid, "DOT_PRECISION": dot_precision(q.dtype),
        })
        return args

    def forward_args(self, out: torch.Tensor, lse: torch.Tensor) -> dict[str, Any]:
        args = self.shared_args()
        args["Out"], args["Lse"] = out, lse
        args.update(self.sink_args())
        args.update(zip(_OUT_STRIDES, self.rows(out)))
        args.update(zip(_LSE_STRIDES, self.row_stats(lse)))
        return args

    def sink_args(self) -> dict[str, Any]:
        return {"Sinks": self.sinks, "SINKS": self.sinks is not None}

    @property
    def flat_grid(self) -> bool:
        """Whether the passes launch one grid axis (``program_coordinates``): only where the batch (or
        the heads) would not fit a grid's second or third axis."""
        return self.batch > GRID_YZ_MAX or self.heads > GRID_YZ_MAX

    def grid(self, pass_name: str, block: int, splits: int = 1) -> tuple[int, ...]:
        """(blocks along the pass's own sequence, query heads or key/value heads x ``splits`` of each
        one's query-head group, batch), or their product on one axis (``flat_grid``)."""
        if pass_name == "backward_dkdv":
            grid = (triton.cdiv(self.max_seqlen_k, block), self.kv_heads * splits, self.batch)
        else:
            grid = (triton.cdiv(self.max_seqlen_q, block), self.heads, self.batch)
        if not self.flat_grid:
            return grid
        programs = grid[0] * grid[1] * grid[2]
        if programs >= 2**31:
            raise ValueError(f"attention on the triton backend: {programs} programs in one launch exceed the GPU's "
                             f"2**31 - 1 (batch {self.batch}, {self.heads} heads, lengths {self.max_seqlen_q} and "
                             f"{self.max_seqlen_k}); split the batch")
        return (programs,)


# Compile-time flags that select a specialization: the autotuner keeps one choice per combination.
TUNE_KEY = [
    "tune_key", "BLOCK_D", "BLOCK_DV", "CAUSAL", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "ALIBI", "MASK",
    "KEY_LENGTHS", "DROPOUT", "VARLEN", "DOT_PRECISION",
    # the flat grid's programs keep more values live (program_coordinates): their tiles are chosen apart
    "FLAT_GRID",
    # the query-head group: a runtime int, but 1 compiles as a constant and the tile rules name it
    "groups",
]


def interpreted(kernel) -> bool:
    return isinstance(kernel, InterpretedFunction)


def _tile_config(tile: configs.Tile) -> triton.Config:
    return triton.Config({"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n},
                         num_warps=tile.num_warps, num_stages=tile.num_stages)


def _current_candidates(pass_name: str, args: dict[str, Any]) -> list[configs.Tile]:
    arch = configs.arch_of(torch.cuda.get_device_capability(args["Q"].device))
    return configs.launch_candidates(pass_name, arch, args)


def without_spills(tiles: list[configs.Tile], spills: Callable[[configs.Tile], int | None],
                   last_resort: configs.Tile) -> list[configs.Tile]:
    """``tiles`` less those the compiler spills registers for, when at least one is known not to spill;
    else ``last_resort`` (a small tile) if it does not spill; else ``tiles`` as they are (the autotuner
    then times them). ``spills(tile)`` is the compiler's spill count, or None when it cannot tell (that
    tile is kept). PyTorch Inductor's autotuner likewise skips configs that spill (past a threshold);
    spill traffic in an attention loop costs more than a smaller tile."""
    if len(tiles) == 1 and tiles[0] == last_resort:
        return tiles
    counts = [spills(tile) for tile in tiles]
    if 0 in counts:
        return [tile for tile, count in zip(tiles, counts) if count is None or count == 0]
    if last_resort not in tiles and spills(last_resort) == 0:
        return [last_resort]
    return tiles


def _compiled_spills(kernel, args: dict[str, Any], tile: configs.Tile) -> int | None:
    """Spilled registers of ``kernel`` compiled for this launch with ``tile`` on the current GPU (Triton's
    ``n_spills``, from the loaded binary's local memory), without launching it; the binary stays in
    Triton's caches for the launch (the same options as the autotuner's, so the same in-memory entry).
    None when the compile fails (the autotuner reports or skips that tile
    as it did before) or this Triton does not expose the count."""
    launch_args = {k: v for k, v in args.items() if k not in ("grid", "warmup")}
    try:
        compiled = kernel.warmup(**launch_args, **_tile_config(tile).all_kwargs(), grid=(1,))
        compiled._init_handles()
        return int(compiled.n_spills)
    except Exception:  # noqa: BLE001  (any failure leaves the tile to the autotuner, as before)
        return None


def tile_pruner(kernel, pass_name: str) -> Callable[..., list]:
    """The autotuner's ``early_config_prune`` for ``kernel``: the running GPU's candidates for a launch's
    arguments, less those that compile with spills (:func:`without_spills`)."""

    def prune(tile_configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        tiles = without_spills(_current_candidates(pass_name, args), lambda t: _compiled_spills(kernel, args, t),
                               configs.last_resort(pass_name))
        wanted = {(t.block_m, t.block_n, t.num_warps, t.num_stages) for t in tiles}
        return [c for c in tile_configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    return prune


def autotuned(kernel, pass_name: str, extra_key: list[str] | None = None, reset_to_zero: list[str] | None = None):
    """``kernel`` under Triton's autotuner, with the candidates of the running GPU's architecture that
    compile without spilling (:func:`tile_pruner`). None under the interpreter (a fixed tile is used
    there; see :func:`run`)."""
    if interpreted(kernel):
        return None
    return triton.autotune(
        configs=[_tile_config(t) for t in configs.all_candidates(pass_name)],
        key=TUNE_KEY + (extra_key or []),
        prune_configs_by={"early_config_prune": tile_pruner(kernel, pass_name)},
        pre_hook=_zeroing(reset_to_zero) if reset_to_zero else None,
    )(kernel)


def _zeroing(names: list[str]) -> Callable[..., None]:
    """The autotuner's hook before each timed run (and once after tuning): zeroes the accumulated outputs
    ``names`` that the launch has. Triton's own ``reset_to_zero`` calls ``.zero_()`` on each name, and so
    fails on an output the launch leaves out (None, e.g. no mask gradient)."""

    def hook(args: dict[str, Any], reset_only: bool = False) -> None:
        for name in names:
            if args.get(name) is not None:
                args[name].zero_()

    return hook


def fixed_tile(kernel, pass_name: str, args: dict[str, Any]) -> configs.Tile:
    """The tile used without autotuning: the interpreter's, else the architecture's first candidate."""
    if interpreted(kernel):
        return configs.interpreter_tile(args["seq_q"], args["seq_k"])
    return _current_candidates(pass_name, args)[0]


def run(kernel, tuned, pass_name: str, problem: Problem, args: dict[str, Any]) -> None:
    """Launches one pass: a fixed tile under the interpreter or in deterministic mode (the autotuner's
    pick could differ between runs, and with it the rounding), else the autotuned kernel."""
    own = "BLOCK_N" if pass_name == "backward_dkdv" else "BLOCK_M"
    splits = args.get("splits", 1)
    with device_guard(problem.q):
        if tuned is None or torch.are_deterministic_algorithms_enabled():
            tile = fixed_tile(kernel, pass_name, args)
            grid = problem.grid(pass_name, tile.block_n if own == "BLOCK_N" else tile.block_m, splits)
            kernel[grid](**args, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                         num_warps=tile.num_warps, num_stages=tile.num_stages)
        else:
            launch_tuned(tuned, lambda meta: problem.grid(pass_name, meta[own], splits), args)


# The tile config the autotuner picked, per autotuner and launch key. Triton's ``Autotuner.run`` rebuilds
# its key on every launch by filtering the ~50 launch arguments against a list (~40 us a launch on a
# 2-core CI machine; ~100 us a call under a profiler on an H200's host, where a BERT-sized forward took
# 418 us for a 5 us kernel). From the second launch of a key on, the picked config is launched the way
# the autotuner launches it.
_PICKED: dict[tuple, Any] = {}


def _launch_key(tuned, args: dict[str, Any]) -> tuple:
    """At least as fine as the autotuner's own key (its key arguments' values, every argument's dtype)."""
    return (id(tuned), *(args.get(name) for name in tuned.keys),
            *(getattr(value, "dtype", None) for value in args.values()))


def launch_tuned(tuned, grid: Callable[[dict[str, Any]], tuple[int, ...]], args: dict[str, Any]) -> None:
    """``tuned[grid](**args)``: through the autotuner the first time a key is seen (it tunes, then
    launches), then directly with the config it picked."""
    key = _launch_key(tuned, args)
    config = _PICKED.get(key)
    if config is None:
        tuned[grid](**args)
        config = tuned.best_config
        if config.pre_hook is None and hasattr(config, "all_kwargs"):
            _PICKED[key] = config
        return
    tuned.fn.run(**args, grid=grid, warmup=False, **config.all_kwargs())
