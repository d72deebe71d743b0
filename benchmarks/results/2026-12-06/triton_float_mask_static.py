"""Static costs of the Triton attention passes for one feature set: the tile dispatch launches first
(bfloat16, head dim 128), its spills and SASS instructions per loop. Usage: FEATURES (comma-separated,
as in tests/test_triton_compile.py) REPO_ROOT (a checkout) ARCH (80 or 90)."""

import sys

features, root, arch = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [root, root + "/tools", root + "/tests"]

import triton_aot  # (tools/ of the checkout given)

call = triton_aot.Call("bfloat16", False, 128, 128, frozenset(features.split(",")), False)
for kernel, pass_name, args in triton_aot.launches(call, arch):
    tile = triton_aot.tiles_for(pass_name, args, arch, False)[0]
    stats = triton_aot.stats(triton_aot.compile_launch(kernel, args, arch, tile))
    print(pass_name, tile, "spills", stats.spill_stores, stats.spill_loads, "loops",
          [loop.instructions for loop in stats.loops])
