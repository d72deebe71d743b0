// The decode kernel's two products on AMX tiles (attention_isa_amx.cpp includes attention_decode.h with
// FUSED_ATTENTION_AMX_DECODE, which includes this), for bfloat16 caches when a kv head serves many query
// rows (speculative decoding's 8 rows, or a large GQA group): there vdpbf16ps did 32 products per key row
// read, and an 8-row causal step read K and V at 9-16% of the memory's rate (2026-12-05 record,
// cpu-shapes-intel-amx-after.md). One tile product does 16 x 16 x 32 of them.
//
// - q.k transposed (from kAmxScoresMinRows rows): S^T = K Q^T. K's rows are A tiles read where they
//   lie in the cache (no packing; 16 rows x 32 features per tile), Q^T is packed once per score block into B
//   tiles, and each 16 x 16 block of S^T is transposed into the score rows on its way out (cheaper than
//   packing K into B tiles: one 16 x 16 transpose per 16 keys and 16 rows against one per 16 keys and
//   32 features).
// - P V (from kAmxDecodeMinRows rows; fewer: attention_decode_widen.h): V's rows packed in pairs (VNNI)
//   128 keys at a time; P as two bfloat16 parts (hi + lo: 16 significant bits), as the blocked AMX
//   forward does (attention_forward_amx.h says why).
#pragma once

#include "cpu/attention_amx.h"

// Query rows per kv head from which P V runs on tiles: below it a 16-row tile is mostly padding, and the
// value rows are widened in registers instead (attention_decode_widen.h). Set against vdpbf16ps pairs;
// not re-measured against the widened FMAs.
constexpr int64_t kAmxDecodeMinRows = 8;
// Query rows per kv head from which q.k runs on tiles. S^T = K Q^T reads K where it lies, so a tile
// product costs the same whatever the rows; with GQA's 4 rows per kv head (Llama's 32 / 8 heads, one
// token) vdpbf16ps did 16 products per key read against the tiles' 4.
constexpr int64_t kAmxScoresMinRows = 4;
// Keys whose value rows are packed at a time for P V (32 KiB at value_dim 128: L1).
constexpr int64_t kAmxDecodeValueKeys = 128;

// Whether the tile products serve a cache of this problem for `rows` query rows per kv head (scores:
// q.k; else P V).
template <typename scalar_t>
bool amx_decode(const Problem<scalar_t>& problem, int64_t rows, bool scores = false) {
  return std::is_same_v<scalar_t, c10::BFloat16> && rows >= (scores ? kAmxScoresMinRows : kAmxDecodeMinRows) &&
         problem.k.feature_stride == 1 && problem.v.feature_stride == 1 && problem.head_dim % tiles::kDepth == 0;
}

// The tile products' buffers (per thread; rows: the most query rows per kv head, padded: a multiple of
// 16). Uninitialised but P's padding rows (zero: their products fill C rows that nothing reads): every
// other element is written before it is read (zero-filled, they took 4-5 us of a call). P's parts only
// where P V runs on tiles (with_probs: rows >= kAmxDecodeMinRows).
struct AmxDecodeBuffers {
  int64_t d_tiles = 0, f_tiles = 0, ldp = 0;
  AlignedArray<c10::BFloat16> q;       // Q^T: B tile (depth d, row tile c) at (c d_tiles + d) 512
  AlignedArray<c10::BFloat16> keys;    // 16 key rows where they are not 16 adjacent rows of the cache
  AlignedArray<float> block;           // S^T of 32 keys x rows (row stride: padded)
  AlignedArray<c10::BFloat16> values;  // V's tiles of kAmxDecodeValueKeys keys
  AlignedArray<c10::BFloat16> p_hi, p_lo;  // P's two parts (SplitProbs from the softmax), row stride ldp
  AmxDecodeBuffers() = default;
  AmxDecodeBuffers(int64_t rows, int64_t padded, int64_t chunk, int64_t head_dim, int64_t value_dim, bool with_probs)
      : d_tiles(head_dim / tiles::kDepth),
        f_tiles((value_dim + tiles::kRows - 1) / tiles::kRows),
        ldp(round_up<int64_t>(chunk, tiles::kDepth) + tiles::kDepth),  // + 32: see kProbStride
        q(aligned_array<c10::BFloat16>(padded / tiles::kRows * d_tiles * tiles::kTileElems)),
        keys(aligned_array<c10::BFloat16>(tiles::kRows * head_dim)),
        block(aligned_array<float>(tiles::kDepth * padded)),
        values(aligned_array<c10::BFloat16>(kAmxDecodeValueKeys / tiles::kDepth * f_tiles * tiles::kTileElems)),
        p_hi(aligned_array<c10::BFloat16>(with_probs ? padded * ldp : 0)),
        p_lo(aligned_array<c10::BFloat16>(with_probs ? padded * ldp : 0)) {
    if (!with_probs) return;
    std::fill(p_hi.get() + rows * ldp, p_hi.get() + padded * ldp, c10::BFloat16(0.0f));
    std::fill(p_lo.get() + rows * ldp, p_lo.get() + padded * ldp, c10::BFloat16(0.0f));
  }
};

// scores[r * lds + j] = q_r . k_(j0 + j) for rows r < round_up(rows, 16) (rows past `rows`: whatever
// the query buffer's padding gives) and keys j < round_up(n, 32) (0 past n). q16: the rows' bfloat16
// query features (row stride head_dim).
template <typename scalar_t>
void amx_scores(const Problem<scalar_t>& problem, const Sequence& seq, int64_t kv_head, int64_t j0, int64_t n,
                const c10::BFloat16* q16, int64_t rows, AmxDecodeBuffers& buf, float* scores, int64_t lds) {
  const Operand<scalar_t>& k = problem.k;
  const int64_t dim = problem.head_dim, r_tiles = (rows + tiles::kRows - 1) / tiles::kRows;
  for (int64_t c = 0; c < r_tiles; ++c) {
    const c10::BFloat16* row_ptrs[tiles::kRows];
    const int64_t count = std::min(tiles::kRows, rows - c * tiles::kRows);
    for (int64_t j = 0; j < count; ++j) row_ptrs[j] = q16 + (c * tiles::kRows + j) * dim;
    tiles::pack_pair_transpose_tiles(row_ptrs, count, dim, buf.q.get() + c * buf.d_tiles * tiles::kTileElems);
  }
  const int64_t ldb = r_tiles * tiles::kRows;
  for (int64_t b = 0; b < n; b += tiles::kDepth) {
    const int64_t count = std::min(tiles::kDepth, n - b), token = seq.k_start + j0 + b;
    if (b + kDecodePrefetchKeys < n) {
      prefetch_tokens(k, seq.batch, kv_head, token + kDecodePrefetchKeys,
                      std::min(tiles::kDepth, n - b - kDecodePrefetchKeys), dim);
    }
    const int64_t key_tiles = (count + tiles::kRows - 1) / tiles::kRows;
    if (count == tiles::kDepth && k.adjacent_rows(token) >= tiles::kDepth) {  // both tiles in one run
      tiles::product(key_tiles, r_tiles, buf.d_tiles, reinterpret_cast<const c10::BFloat16*>(k.row(seq.batch, kv_head, token)),
                     k.token_stride, buf.q.get(), tiles::kTileElems, buf.d_tiles * tiles::kTileElems, buf.block.get(),
                     ldb, false);
    } else {
      // Tile by tile: in place where 16 rows are adjacent (a paged cache's page of 16 or more), else the
      // rows copied (the sequence's last keys, a page boundary or short pages), zero past n.
      for (int64_t t = 0; t < key_tiles; ++t) {
        const int64_t rows_t = std::min(tiles::kRows, count - t * tiles::kRows), at = token + t * tiles::kRows;
        const c10::BFloat16* a = buf.keys.get();
        int64_t lda = dim;
        if (rows_t == tiles::kRows && k.adjacent_rows(at) >= tiles::kRows) {
          a = reinterpret_cast<const c10::BFloat16*>(k.row(seq.batch, kv_head, at));
          lda = k.token_stride;
        } else {
          load_rows(k, seq.batch, kv_head, at, rows_t, dim, buf.keys.get(), dim);
          std::fill(buf.keys.get() + rows_t * dim, buf.keys.get() + tiles::kRows * dim, c10::BFloat16(0.0f));
        }
        tiles::product(1, r_tiles, buf.d_tiles, a, lda, buf.q.get(), tiles::kTileElems,
                       buf.d_tiles * tiles::kTileElems, buf.block.get() + t * tiles::kRows * ldb, ldb, false);
      }
    }
    for (int64_t t = 0; t < key_tiles; ++t) {
      for (int64_t c = 0; c < r_tiles; ++c) {  // 16 keys x 16 rows of S^T into 16 score rows
        const c10::BFloat16* key_rows[tiles::kRows];
        for (int64_t j = 0; j < tiles::kRows; ++j) {
          key_rows[j] = reinterpret_cast<const c10::BFloat16*>(buf.block.get() + (t * tiles::kRows + j) * ldb + c * tiles::kRows);
        }
        tiles::pack_pair_transpose(key_rows, tiles::kRows, 0, tiles::kDepth,
                                   reinterpret_cast<c10::BFloat16*>(scores + c * tiles::kRows * lds + b + t * tiles::kRows),
                                   2 * lds);
      }
    }
  }
}

// acc[r * ldv + f] += sum_j p_j v_j[f] for rows r < round_up(rows, 16) (acc has them) and keys j < n
// (v_j at row_of(j)); P's parts in buf.p_hi / p_lo (AmxDecodeProbs; 0 past n up to a multiple of 32).
// scattered: see prefetch_rows.
template <typename RowOf>
void amx_values(int64_t rows, int64_t n, const RowOf& row_of, int64_t value_dim, AmxDecodeBuffers& buf, float* acc,
                int64_t ldv, bool scattered) {
  const int64_t r_tiles = (rows + tiles::kRows - 1) / tiles::kRows, f_tiles = buf.f_tiles;
  for (int64_t b = 0; b < n; b += kAmxDecodeValueKeys) {
    const int64_t count = std::min(kAmxDecodeValueKeys, n - b);
    const int64_t chunks = (count + tiles::kDepth - 1) / tiles::kDepth;
    for (int64_t key = 0; key < chunks * tiles::kDepth; key += 2) {
      c10::BFloat16* dst = tiles::value_pair_row(buf.values.get(), key, f_tiles);
      if (key < count) {
        const int64_t j = b + key;
        if (scattered && j + kDecodePrefetchKeys + 1 < n) {
          prefetch_rows(row_of(j + kDecodePrefetchKeys), 1, 0, value_dim * 2);
          prefetch_rows(row_of(j + kDecodePrefetchKeys + 1), 1, 0, value_dim * 2);
        }
        tiles::pack_pair_rows(row_of(j), key + 1 < count ? row_of(j + 1) : nullptr, value_dim, f_tiles, dst);
      } else {  // past the chunk's keys: zero (their probabilities are 0, and 0 x NaN is not)
        for (int64_t f = 0; f < f_tiles; ++f) std::fill_n(dst + f * tiles::kTileElems, 2 * tiles::kRows, c10::BFloat16(0.0f));
      }
    }
    tiles::product(r_tiles, f_tiles, chunks, buf.p_hi.get() + b, buf.ldp, buf.values.get(), f_tiles * tiles::kTileElems,
                   tiles::kTileElems, acc, ldv, true, buf.p_lo.get() + b);
  }
}

// softmax_block's writer of row r's probabilities (r from `first`) into P's two parts.
struct AmxDecodeProbs {
  AmxDecodeBuffers* buf;
  int64_t first;
  tiles::SplitProbs operator()(int64_t r, float*) const {
    return {buf->p_hi.get() + (first + r) * buf->ldp, buf->p_lo.get() + (first + r) * buf->ldp};
  }
};
