// Launch shape shared by the CUDA positional kernels: each block row (threadIdx.y) walks rows (tokens)
// with a grid-stride loop, and the threads of a block row (threadIdx.x) split one row's work items.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fused_attention::gpu {

struct RowLaunch {
  dim3 blocks;
  dim3 threads;
};

// Threads per row cover its items (rounded to whole warps, at most a block); short rows share a block,
// so every block has kThreadsPerBlock threads. The grid-stride loop covers rows past max_blocks.
inline RowLaunch row_launch(int64_t rows, int64_t items_per_row, int64_t max_blocks = int64_t{1} << 20) {
  constexpr int64_t kThreadsPerBlock = 256, kWarp = 32;
  const int64_t per_row = std::clamp((items_per_row + kWarp - 1) / kWarp * kWarp, kWarp, kThreadsPerBlock);
  const int64_t rows_per_block = kThreadsPerBlock / per_row;
  const int64_t blocks = std::clamp((rows + rows_per_block - 1) / rows_per_block, int64_t{1}, max_blocks);
  return {dim3(static_cast<unsigned>(blocks)),
          dim3(static_cast<unsigned>(per_row), static_cast<unsigned>(rows_per_block))};
}

}  // namespace fused_attention::gpu
