"""Cases run inside spawned gloo ranks by ``test_distributed.py`` (a module the children can import).

Every rank builds the same whole-sequence inputs from one seed, runs the context-parallel function on
its shard, and checks its shard of the output, lse and gradients against the reference on the whole
sequence by DESIGN.md's tolerance policy (the reference in the input dtype and in float64).
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist

from fused_attention.check import within_tolerance
from fused_attention.distributed import ring_attention, shard_sequence, ulysses_attention, unshard_sequence
from fused_attention.reference import reference_attention


def _policy(out, ref_dt, ref64, factor, what):
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(out), inf), f"{what}: infinities differ"
    out, ref_dt, ref64 = (t.detach().double().masked_fill(inf, 0.0) for t in (out, ref_dt, ref64))
    ok, err, bound = within_tolerance(out, ref_dt, ref64, factor)
    assert ok, f"{what}: max error {err:.3e} > bound {bound:.3e}"


def check_against_whole(world: int, fn: str, layout: str, dtype: torch.dtype, length: int, heads=(4, 4),
                        head_dim=16, batch=1, alibi=False, strided=False, sinks=False, **kwargs) -> None:
    """Outputs, lse and gradients of ``fn`` on shards equal attention on the whole sequence; with
    ``alibi`` / ``sinks``, also the gradients of the slopes / sinks summed over the ranks (each rank
    holds its share)."""
    gen = torch.Generator().manual_seed(1234)
    hq, hkv = heads
    whole = [torch.randn(batch, h, length, head_dim, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv)]
    upstream = torch.randn(batch, hq, length, head_dim, generator=gen, dtype=torch.float64)
    params = {}  # replicated parameters: float64 values; (ours, the reference in dtype) dtypes
    if alibi:  # per head, or per batch and head when batch > 1 (unless "per_head"); float32 whatever the inputs
        per_batch = (batch,) if batch > 1 and alibi != "per_head" else ()
        slopes = torch.rand(*per_batch, hq, generator=gen, dtype=torch.float64) * 0.5 + 0.05
        params["alibi_slopes"] = (slopes, torch.float32, torch.float32)
    if hq != hkv:
        kwargs["enable_gqa"] = True
    if sinks:
        sink_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        params["sinks"] = (2 * torch.randn(hq, generator=gen, dtype=torch.float64), sink_dtype, dtype)
    refs = {}
    for label, dt in (("dt", dtype), ("64", torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in whole]
        ref_kwargs = {name: value for name, value in kwargs.items() if name not in ("backend", "head_groups")}
        extra = [value.to(torch.float64 if label == "64" else ref_dt).requires_grad_()
                 for value, _, ref_dt in params.values()]
        ref_kwargs |= dict(zip(params, extra))
        out, lse = reference_attention(*leaves, **ref_kwargs)
        refs[label] = [out, lse, *torch.autograd.grad(out, leaves + extra, upstream.to(dt))]
    mine = [value.to(ours).requires_grad_() for value, ours, _ in params.values()]
    kwargs |= dict(zip(params, mine))
    shard = [shard_sequence(t.to(dtype), layout=layout) for t in whole]
    if strided:  # (B, L, H, D) memory seen as (B, H, L, D): not contiguous
        shard = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in shard]
    before = [t.clone() for t in shard]
    shard = [t.requires_grad_() for t in shard]
    attention = ring_attention if fn == "ring" else ulysses_attention
    out, lse = attention(*shard, layout=layout, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, shard + mine, shard_sequence(upstream.to(dtype), layout=layout))
    assert all(torch.equal(t, b) for t, b in zip(shard, before, strict=True)), "inputs were modified"
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, mine_t, factor, i in (("out", out, 2, 0), ("lse", lse, 2, 1), ("dq", grads[0], 3, 2),
                                    ("dk", grads[1], 3, 3), ("dv", grads[2], 3, 4)):
        ref_dt, ref64 = (shard_sequence(refs[label][i].detach(), layout=layout, dim=2) for label in ("dt", "64"))
        _policy(mine_t, ref_dt, ref64, factor, name)
    for j, name in enumerate(params):
        total = grads[3 + j].double()
        dist.all_reduce(total)
        _policy(total, refs["dt"][5 + j], refs["64"][5 + j], 3, f"d{name} (sum over ranks)")


def expect_error(fn, match: str) -> None:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        assert match in str(e), f"error {e!s} does not mention {match!r}"
        return
    raise AssertionError("no error raised")


def bad_shape_on_one_rank(world: int) -> None:
    """Rank 1 passes a wrong head dim: every rank raises (nobody waits in the ring)."""
    rank = dist.get_rank()
    dim = 8 if rank == 1 else 16
    q, k, v = (torch.randn(1, 2, 4, dim) for _ in range(3))
    if rank == 1:
        expect_error(lambda: ring_attention(q, k, v[..., :3, :]), "value sequence length")
    else:
        expect_error(lambda: ring_attention(q, k, v), "invalid arguments")
    # Same valid shapes locally but different across ranks: all raise, naming the field.
    expect_error(lambda: ring_attention(q, k, v, layout="contiguous"), "head dim differs across ranks")
    q, k, v = (torch.randn(1, 2 * world, 4, 8) for _ in range(3))
    sinks = torch.full((2 * world,), float(rank))  # sinks must be the same parameter on every rank
    # the same values in another order on each rank (a sum alone took them): slopes and sinks per head
    permuted = torch.arange(2.0 * world).roll(rank)
    for attention in (ring_attention, ulysses_attention):
        expect_error(lambda fn=attention: fn(q, k, v, sinks=sinks), "sinks values differs across ranks")
        expect_error(lambda fn=attention: fn(q, k, v, sinks=permuted), "sinks values differs across ranks")
        expect_error(lambda fn=attention: fn(q, k, v, alibi_slopes=permuted / 8 + 0.1),
                     "alibi_slopes values differs across ranks")
    # a field that travels as a number is named as the user wrote it (was "rank 0 has 2, rank 1 has 3")
    cast = q.double() if rank == 1 else q
    expect_error(lambda: ring_attention(cast, k.to(cast.dtype), v.to(cast.dtype)),
                 "dtype differs across ranks: rank 0 has torch.float32, rank 1 has torch.float64")
    wrong = torch.zeros(3) if rank == 0 else torch.zeros(2 * world)
    expect_error(lambda: ring_attention(q, k, v, sinks=wrong), "sinks must have shape" if rank == 0 else "invalid")


def ring_backward_twice(world: int) -> None:
    """A second backward through one ring_attention graph (retain_graph=True) raises, naming why (it freed
    the blocks it saved as it went: a TypeError mid-loop before); the first is right; ulysses can."""
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, is_causal=True)
    first = torch.autograd.grad(out.sum(), q, retain_graph=True)[0]
    assert torch.isfinite(first).all()
    expect_error(lambda: torch.autograd.grad(out.sum(), k), "runs once per forward")
    out = ulysses_attention(*(t.repeat(1, world, 1, 1) for t in (q, k, v)), is_causal=True)
    torch.autograd.grad(out.sum(), q, retain_graph=True)
    torch.autograd.grad(out.sum(), k)


def options_differ_by_rank(world: int) -> None:
    """An unknown backend on one rank, a different backend, a non-bool return_lse: every rank raises
    before any transfer (an unknown name raised mid-ring and stranded the others; cpu and torch send
    values of different widths around the ring, and gloo aborted the process)."""
    rank = dist.get_rank()
    q, k, v = (torch.randn(1, 2, 4 * world, 8, requires_grad=True) for _ in range(3))
    bad = "nope" if rank == 1 else "torch"
    expect_error(lambda: ring_attention(q, k, v, backend=bad), "backend must be one of" if rank == 1 else "invalid")
    mixed = "cpu" if rank == 1 else "torch"
    for attention in (ring_attention, ulysses_attention):
        expect_error(lambda fn=attention: fn(q, k, v, is_causal=True, backend=mixed),
                     "backend differs across ranks: rank 0 has 'torch', rank 1 has 'cpu'")
        expect_error(lambda fn=attention: fn(q, k, v, return_lse="no"), "return_lse must be a bool")
    if world >= 3:  # what new_group returns on the ranks it leaves out is not a group (was "got int")
        pair = dist.new_group([0, 1])
        if rank >= 2:
            expect_error(lambda: ring_attention(q, k, v, group=pair), "not a member of the group")


def unshard_mismatches(world: int) -> None:
    """Shards that cannot form one sequence raise on every rank: zigzag shards of odd or unequal lengths
    (tokens were lost and slots left unwritten), shapes or dtypes that differ outside the sequence dim
    (gloo aborted the process)."""
    rank = dist.get_rank()
    expect_error(lambda: unshard_sequence(torch.zeros(1, 1, 3, 2)), "divisible by 2 * group size")
    expect_error(lambda: unshard_sequence(torch.zeros(1, 1, 2 + 2 * rank, 2)), "length differs across ranks")
    expect_error(lambda: unshard_sequence(torch.zeros(1, 2 + rank, 4, 3), layout="contiguous"),
                 "size of dim 2 differs across ranks")
    dtype = torch.float64 if rank == 1 else torch.float32
    expect_error(lambda: unshard_sequence(torch.zeros(1, 1, 4, 2, dtype=dtype)), "dtype differs across ranks")
    # contiguous shards may differ in length, down to nothing
    lengths = [2 * r for r in range(world)]
    x = torch.arange(sum(lengths), dtype=torch.float32).view(1, 1, -1, 1)
    own = x[:, :, sum(lengths[:rank]) : sum(lengths[: rank + 1])]
    assert torch.equal(unshard_sequence(own, layout="contiguous"), x)


def round_trip(world: int) -> None:
    gen = torch.Generator().manual_seed(7)
    for layout, length in (("zigzag", 8 * world), ("contiguous", 5 * world + 3)):
        x = torch.randn(2, 3, length, 5, generator=gen)
        labels = torch.randint(0, 100, (2, length), generator=gen)
        assert torch.equal(unshard_sequence(shard_sequence(x, layout=layout), layout=layout), x)
        assert torch.equal(unshard_sequence(shard_sequence(labels, layout=layout, dim=1), layout=layout, dim=1), labels)
    expect_error(lambda: shard_sequence(torch.randn(1, 1, 2 * world + 1, 4), layout="zigzag"), "divisible by 2")


def device_mesh_group(world: int) -> None:
    """A 1-D DeviceMesh is a group; a 2-D one is refused on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4 * world, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    shards = [shard_sequence(t, group=mesh) for t in (q, k, v)]
    out = unshard_sequence(ring_attention(*shards, group=mesh, is_causal=True), group=mesh)
    ref, _ = reference_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max() < 1e-12
    if world == 4:
        square = init_device_mesh("cpu", (2, 2))
        expect_error(lambda: ring_attention(*shards, group=square), "must be 1-D")


def head_groups_run(world: int) -> None:
    """The rings run per head group: ``world`` forward steps per group (the step timer's count), for an
    explicit count and for the default (one thread per rank here: a ring per key/value head)."""
    from fused_attention.distributed import ring

    for heads, head_groups, expected in (((4, 4), 3, 3), ((6, 2), None, 2), ((4, 4), 1, 1)):
        steps = []
        ring.step_timer = lambda phase, *_, seen=steps: seen.append(phase)
        try:
            q, k, v = (torch.randn(1, h, 2 * world, 8, requires_grad=True) for h in (heads[0], heads[1], heads[1]))
            ring_attention(q, k, v, is_causal=True, enable_gqa=True, head_groups=head_groups).sum().backward()
        finally:
            ring.step_timer = None
        assert steps.count("forward") == expected * world, (heads, head_groups, steps.count("forward"))
        assert steps.count("backward") == expected * world, (heads, head_groups, steps.count("backward"))


def second_derivative_raises(world: int) -> None:
    """A create_graph gradient through the ring equals the plain one; a penalty through it raises on every
    rank (it carried no graph, or a partial one through the sinks' gradient)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 4 * world, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    shards = [shard_sequence(t) for t in (q, k, v)]
    leaf = shards[0].clone().requires_grad_()
    sinks = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(ring_attention(leaf, *shards[1:], is_causal=True, sinks=sinks).square().sum(),
                                   leaf, create_graph=True)
    (plain,) = torch.autograd.grad(ring_attention(leaf, *shards[1:], is_causal=True, sinks=sinks).square().sum(),
                                   leaf)
    assert torch.equal(first.detach(), plain)
    expect_error(lambda: torch.autograd.grad(first.square().sum() + leaf.sum(), leaf), "no derivative of their own")


def under_autocast(world: int) -> None:
    """Under CPU autocast to bfloat16 both return bfloat16, as scaled_dot_product_attention: the ring the
    same numbers as on bfloat16 inputs, and gradients reach the float32 leaves (the ring returned float32,
    its blocks computed in float32 or bfloat16 by backend)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (shard_sequence(torch.randn(1, 12, 4 * world, 8, generator=gen)).requires_grad_() for _ in range(3))
    for attention in (ring_attention, ulysses_attention):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(q, k, v, is_causal=True)
        assert out.dtype == torch.bfloat16, (attention.__name__, out.dtype)
        assert torch.equal(out, attention(*(t.detach().bfloat16() for t in (q, k, v)), is_causal=True))
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)


def _cases(world: int) -> dict:
    zz = 8 * world * 2 if world < 4 else 48  # divisible by 2P; chunks of 4-8 tokens
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    c = {
        "ring_zigzag_f64_causal": lambda: check_against_whole(world, "ring", "zigzag", f64, zz, is_causal=True),
        "ring_zigzag_f64_full": lambda: check_against_whole(world, "ring", "zigzag", f64, zz),
        "ring_contiguous_f64_causal": lambda: check_against_whole(world, "ring", "contiguous", f64, zz, is_causal=True),
        "ring_zigzag_f32_causal_gqa": lambda: check_against_whole(world, "ring", "zigzag", f32, zz, heads=(4, 2),
                                                                  is_causal=True, batch=2),
        "ring_zigzag_f16_causal_strided": lambda: check_against_whole(world, "ring", "zigzag", torch.float16, zz,
                                                                      is_causal=True, strided=True),
        "ring_zigzag_bf16_causal": lambda: check_against_whole(world, "ring", "zigzag", bf16, zz, is_causal=True),
        "ring_zigzag_f32_window_causal": lambda: check_against_whole(world, "ring", "zigzag", f32, zz,
                                                                     is_causal=True, window_size=(5, 0)),
        "ring_contiguous_f32_window": lambda: check_against_whole(world, "ring", "contiguous", f32, zz,
                                                                  window_size=(6, 3)),
        "ring_zigzag_f64_alibi_causal": lambda: check_against_whole(world, "ring", "zigzag", f64, zz, alibi=True,
                                                                    is_causal=True),
        "ring_contiguous_f32_alibi_softcap": lambda: check_against_whole(world, "ring", "contiguous", f32, zz,
                                                                         alibi=True, softcap=3.0),
        "ring_zigzag_f32_softcap_causal": lambda: check_against_whole(world, "ring", "zigzag", f32, zz,
                                                                      softcap=2.0, is_causal=True),
        # Scores of a few tens (scale 6): float32's spacing at |lse| is a same-signed error in every exp(S -
        # lse) of a row; the blocks' lse are merged in float64 so that the gradients keep the policy.
        "ring_zigzag_f32_causal_window_scale6": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, is_causal=True, window_size=(5, 0), scale=6.0),
        "ring_zigzag_f32_causal_alibi_scale6": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, is_causal=True, alibi=True, scale=6.0),
        "ring_zigzag_f32_right_window": lambda: check_against_whole(world, "ring", "zigzag", f32, zz,
                                                                    window_size=(-1, 2)),
        "ring_zigzag_bf16_causal_wide_window": lambda: check_against_whole(world, "ring", "zigzag", bf16, zz,
                                                                           is_causal=True, window_size=(20, -1)),
        "ring_contiguous_f64_gqa_alibi_batch_softcap_window": lambda: check_against_whole(
            world, "ring", "contiguous", f64, zz, heads=(4, 2), batch=2, alibi=True, softcap=1.5,
            window_size=(9, 4)),
        "ring_contiguous_uneven_f32_causal_window": lambda: check_against_whole(
            world, "ring", "contiguous", f32, zz + world - 1, is_causal=True, window_size=(7, 0)),
        "ring_zigzag_f32_causal_gqa_sinks": lambda: check_against_whole(world, "ring", "zigzag", f32, zz,
                                                                        heads=(4, 2), is_causal=True, sinks=True),
        "ring_contiguous_f64_alibi_softcap_window_sinks": lambda: check_against_whole(
            world, "ring", "contiguous", f64, zz + 1, alibi=True, softcap=2.0, window_size=(6, 3), sinks=True),
        "ring_zigzag_f32_window_softcap_torch_backend": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, heads=(4, 2), is_causal=True, window_size=(5, 0), softcap=2.0,
            sinks=True, backend="torch"),
        # The torch backend's blocks take the global statistics too (its precise-lse forward and
        # backward from statistics): through shifted scores and a ones column, dv missed the bound by
        # 1.25x (softcap) and a rank failed (ALiBi) at scale 6.
        "ring_zigzag_f32_causal_softcap50_scale6_torch_backend": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, is_causal=True, softcap=50.0, scale=6.0, backend="torch"),
        "ring_zigzag_f32_causal_alibi_scale6_torch_backend": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, is_causal=True, alibi=True, scale=6.0, backend="torch"),
        "ring_zigzag_f32_causal_triton_backend": lambda: check_against_whole(
            world, "ring", "zigzag", f32, 4 * world, head_dim=8, is_causal=True, backend="triton"),
        # One thread per rank: by default a ring per key/value head; these run one group, uneven groups
        # with every per-head input (slopes, sinks), and a count that differs by rank (the fewest wins).
        "ring_zigzag_f32_causal_gqa_one_head_group": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, heads=(4, 2), is_causal=True, batch=2, head_groups=1),
        "ring_contiguous_f64_alibi_sinks_three_head_groups": lambda: check_against_whole(
            world, "ring", "contiguous", f64, zz, heads=(8, 4), batch=2, alibi=True, sinks=True, softcap=2.0,
            window_size=(9, 4), head_groups=3),
        "ring_zigzag_f32_head_groups_by_rank": lambda: check_against_whole(
            world, "ring", "zigzag", f32, zz, is_causal=True, head_groups=dist.get_rank() + 2),
        "ring_head_groups_run": lambda: head_groups_run(world),
        "ring_bad_head_groups": lambda: expect_error(
            lambda: ring_attention(*(torch.randn(1, 2, 2 * world, 8) for _ in range(3)), head_groups=0),
            "head_groups must be a positive int"),
        "ring_zigzag_not_divisible": lambda: expect_error(
            lambda: ring_attention(*(torch.randn(1, 2, 3, 8) for _ in range(3))), "divisible by 2 * group size"),
        "ulysses_contiguous_f32_causal": lambda: check_against_whole(world, "ulysses", "contiguous", f32, zz,
                                                                     heads=(12, 12), is_causal=True),
        "ulysses_zigzag_f64_alibi_window": lambda: check_against_whole(world, "ulysses", "zigzag", f64, zz,
                                                                       heads=(12, 12), alibi=True,
                                                                       window_size=(5, 2), is_causal=True),
        "ulysses_contiguous_uneven_bf16_softcap": lambda: check_against_whole(
            world, "ulysses", "contiguous", bf16, zz + 1, heads=(12, 12), softcap=2.0),
        "ulysses_zigzag_f32_causal_sinks": lambda: check_against_whole(world, "ulysses", "zigzag", f32, zz,
                                                                       heads=(12, 12), is_causal=True, sinks=True),
        "ulysses_heads_not_divisible": lambda: expect_error(
            lambda: ulysses_attention(*(torch.randn(1, 12 * world + 1, 2 * world, 8) for _ in range(3))),
            "must be divisible by the group size"),
        "ulysses_zigzag_f64_batch_per_head_alibi": lambda: check_against_whole(
            world, "ulysses", "zigzag", f64, zz, heads=(12, 12), batch=2, alibi="per_head", is_causal=True),
        "options_differ_by_rank": lambda: options_differ_by_rank(world),
        "unshard_mismatches": lambda: unshard_mismatches(world),
        "bad_shape_on_one_rank": lambda: bad_shape_on_one_rank(world),
        "shard_round_trip": lambda: round_trip(world),
        "device_mesh_group": lambda: device_mesh_group(world),
        "ring_second_derivative_raises": lambda: second_derivative_raises(world),
        "ring_backward_twice": lambda: ring_backward_twice(world),
        "under_autocast": lambda: under_autocast(world),
    }
    if world == 2:
        c["ulysses_f32_gqa"] = lambda: check_against_whole(world, "ulysses", "zigzag", f32, zz, heads=(4, 2),
                                                           is_causal=True)
    return c


CASE_NAMES = sorted(_cases(3))  # world 2 adds ulysses_f32_gqa (heads divisible by 2 only)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Runs every case on this rank; writes ``{case: "ok" | error}`` and the seconds taken to a json file.

    For a rank that dies instead (a signal, not a Python error), or hangs past the parent's timeout (which
    sends SIGUSR1 first), ``rank{r}.progress`` names the case it was in and ``rank{r}.fault`` holds
    faulthandler's Python stack of every thread: the parent's failure message shows both. The rank ends
    with ``os._exit`` once its results are written and the group is destroyed: interpreter finalization
    in a spawned child with gloo's threads still around can abort the process (pytorch/pytorch#179291),
    after every case has passed.
    """
    fault = open(os.path.join(out_dir, f"rank{rank}.fault"), "w")  # noqa: SIM115 - open until os._exit
    faulthandler.enable(file=fault, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=fault, all_threads=True)  # the parent's timeout asks
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, case in sorted(_cases(world).items()):
        with open(os.path.join(out_dir, f"rank{rank}.progress"), "w") as f:
            f.write(f"in case {name} ({len(results)} finished)")
        start = time.perf_counter()
        try:
            case()
            results[name] = ["ok", time.perf_counter() - start]
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = [traceback.format_exc(limit=4), time.perf_counter() - start]
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.progress"), "w") as f:
        f.write(f"all {len(results)} cases finished; destroying the process group")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    gc.collect()
    faulthandler.unregister(signal.SIGUSR1)
    faulthandler.disable()
    fault.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
