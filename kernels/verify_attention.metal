// verify_attention.metal: body of the mx.fast.metal_kernel named "verify_attention".
// MLX generates the signature around it; mtp_mlx/ops/verify_attention.py builds and launches it,
// kernels/check_kernels.py runs the same text on the CPU against kernels/shim/metal_shim.h.
//
// Inputs, in this order (names and order: KERNEL_INPUT_NAMES in mtp_mlx/ops/verify_attention.py)
//   q      [B, nH, Lq, D]   T        queries: the K+1 verify chunk (Lq = K+1) or one decode step
//   k, v   [B, nKV, Lk, D]  T        cache keys and values, slots in physical (ring) order
//   q_pos  [B, Lq]          int32    absolute position of each query
//   k_pos  [B, Lk]          int32    absolute position held by each slot, -1 = empty slot
//   window [1]              int32    sliding window, 0 = full attention
//   scale  [1]              float32  score scale
// Output: out [B, nH, Lq, D] T. Key j is visible to query i iff 0 <= k_pos <= q_pos and
//   (window == 0 or q_pos - k_pos < window); a query that sees no key gets zeros.
// Template: T = float | float16_t | bfloat16_t (MLX's names for float, half, bfloat); D = head dim (multiple of 32, at most 512);
//   BK = key slots per tile (1..32); RPS = query rows per simdgroup.
// Launch: threadgroup (32 * NSG, 1, 1) with NSG = 1..8 simdgroups;
//   grid (32 * NSG * n_blocks, nKV, B), n_blocks = ceil(rows / (NSG * RPS)).
//
// Design. A row is one (GQA head, query position) pair of a kv head: rows = nH / nKV * Lq. One
// threadgroup serves one batch row, one kv head and a block of NSG * RPS rows; simdgroup s owns
// RPS of them. Keys stream through threadgroup memory in tiles of BK slots: each tile of K and V
// is read from device memory once and used by every row of the block, i.e. by all GQA heads of
// the kv head and all K+1 positions at once. Lane l holds elements e * 32 + l (e < D / 32) of its
// rows' scaled query and output accumulator, in float. A score is the simd_sum of the lanes'
// partial dot products; lane j keeps the score of tile slot j, so the online softmax takes the
// tile maximum with simd_max, the normaliser with simd_sum and each weight with simd_shuffle.
// Masks come from q_pos / k_pos / window on the fly (va_key_visible in common.h); a tile no key of
// which is visible to a row is skipped for that row (a uniform branch per simdgroup).
// Every barrier and SIMD-group function below is reached by all threads / lanes.

constexpr int EPL = D / 32;            // elements of a D-vector held by each lane
constexpr float NEG_BIG = -3.0e38f;    // "no score yet"; finite, so exp() never sees inf - inf

const int n_heads = q_shape[1];
const int n_q = q_shape[2];
const int n_kv = k_shape[1];
const int n_k = k_shape[2];
const int gqa = n_heads / n_kv;
const int n_rows = gqa * n_q;
const int win = window[0];
const float sc = scale[0];

const uint lane = thread_index_in_simdgroup;
const uint tid = thread_index_in_threadgroup;
const uint n_threads = threads_per_threadgroup.x;
const int b = int(threadgroup_position_in_grid.z);
const int kvh = int(threadgroup_position_in_grid.y);
const int row0 =
    int(threadgroup_position_in_grid.x * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * RPS;
const int64_t kv_base = (int64_t(b) * n_kv + kvh) * int64_t(n_k) * D;

threadgroup T k_tile[BK * D];
threadgroup T v_tile[BK * D];
threadgroup int kp_tile[BK];

float qv[RPS][EPL];
float acc[RPS][EPL];
float m_run[RPS];
float l_run[RPS];
int qp[RPS];
int64_t row_base[RPS];

for (int r = 0; r < RPS; ++r) {
  const int row = row0 + r;
  const bool active = row < n_rows;
  const int g = active ? row / n_q : 0;
  const int i = active ? row % n_q : 0;
  row_base[r] = ((int64_t(b) * n_heads + kvh * gqa + g) * n_q + i) * D;
  qp[r] = active ? int(q_pos[b * n_q + i]) : -1;  // an inactive row sees no key
  for (int e = 0; e < EPL; ++e) {
    qv[r][e] = active ? float(q[row_base[r] + e * 32 + lane]) * sc : 0.0f;
    acc[r][e] = 0.0f;
  }
  m_run[r] = NEG_BIG;
  l_run[r] = 0.0f;
}

for (int j0 = 0; j0 < n_k; j0 += BK) {
  const int n_tile = metal::min(BK, n_k - j0);

  // Cooperative load: the tile is BK contiguous rows of K (and of V) in device memory.
  for (uint idx = tid; idx < uint(n_tile * D); idx += n_threads) {
    const int64_t src = kv_base + int64_t(j0) * D + idx;
    k_tile[idx] = k[src];
    v_tile[idx] = v[src];
  }
  if (tid < uint(BK)) {
    kp_tile[tid] = int(tid) < n_tile ? int(k_pos[b * n_k + j0 + int(tid)]) : -1;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

  const int kp = lane < uint(BK) ? kp_tile[lane] : -1;
  for (int r = 0; r < RPS; ++r) {
    const bool vis = va_key_visible(kp, qp[r], win);
    if (metal::simd_any(vis)) {
      float s = NEG_BIG;
      for (int j = 0; j < n_tile; ++j) {
        float part = 0.0f;
        for (int e = 0; e < EPL; ++e) {
          part += qv[r][e] * float(k_tile[j * D + e * 32 + lane]);
        }
        const float score = metal::simd_sum(part);
        if (int(lane) == j) {
          s = score;
        }
      }
      s = vis ? s : NEG_BIG;
      const float m_new = metal::max(m_run[r], metal::simd_max(s));
      const float factor = metal::exp(m_run[r] - m_new);
      const float p = vis ? metal::exp(s - m_new) : 0.0f;
      l_run[r] = l_run[r] * factor + metal::simd_sum(p);
      m_run[r] = m_new;
      for (int e = 0; e < EPL; ++e) {
        acc[r][e] *= factor;
      }
      for (int j = 0; j < n_tile; ++j) {
        const float pj = metal::simd_shuffle(p, ushort(j));
        if (pj > 0.0f) {
          for (int e = 0; e < EPL; ++e) {
            acc[r][e] += pj * float(v_tile[j * D + e * 32 + lane]);
          }
        }
      }
    }
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
}

for (int r = 0; r < RPS; ++r) {
  if (row0 + r < n_rows) {
    const float inv = l_run[r] > 0.0f ? 1.0f / l_run[r] : 0.0f;
    for (int e = 0; e < EPL; ++e) {
      out[row_base[r] + e * 32 + lane] = T(acc[r][e] * inv);
    }
  }
}
