# Alternating processes of two builds: $BUILDS/A and $BUILDS/F each hold a copy of the fused_attention
# package with its extension (A: 8d3bbfd, F: this session's kernels). bash tile_calls_before_after.sh BUILDS
HERE=$(cd "$(dirname "$0")" && pwd)
BUILDS=$1
cd "$HERE/../../.."
for i in 1 2 3 4 5 6 7; do for x in A F; do
 echo "$x bwd_gqa2_2048_2t $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_backward_time.py 2 2048 2 2>/dev/null)"
 echo "$x bwd_mqa_2048_2t $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_backward_time.py 1 2048 2 2>/dev/null)"
 echo "$x dec_bf16_32768 $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_decode_time.py bfloat16 32768 2 2>/dev/null)"
 echo "$x dec_f32_32768 $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_decode_time.py float32 32768 2 2>/dev/null)"
 echo "$x dec_bf16_4096 $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_decode_time.py bfloat16 4096 2 2>/dev/null)"
 echo "$x fwd_8x12x128x64_f32 $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_forward_time.py 8x12x128x64 float32 2 2>/dev/null)"
 echo "$x fwd_4x16x256x128_f32 $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_forward_time.py 4x16x256x128 float32 2 2>/dev/null)"
 echo "$x fwd_8x12x128x64_bf16 $(PYTHONPATH=$BUILDS/$x .venv/bin/python $HERE/tile_calls_forward_time.py 8x12x128x64 bfloat16 2 2>/dev/null)"
done; done
