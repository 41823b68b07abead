// y[M, N] = x[M, K] @ W[K, N] on CPU, with W pre-packed in column panels: packed[p, k, j] = W[k, 32 p + j]
// (N padded with zeros to a multiple of 32). See packed_matmul.py for why and when the sampler uses it.
//
// A decode step multiplies a few rows (the slots of a device) by every weight of the model once: the step
// streams the weights from memory, and XLA:CPU's Eigen GEMM packs each weight panel anew on every call (an
// extra pass over the weights, measured ~30 GFLOP/s at 8 rows on the h896 shapes). Packed once per weight
// update, each panel is one contiguous stream: read once per row block, prefetched ahead, multiplied into a
// register tile of ROWS x 32 accumulators.
//
// Built at first use by packed_matmul.py with the host's compiler; the instruction-set path follows the flags it
// is built with (packed_matmul.ISA_FLAGS: -march=native for the sampler; AVX2 and a baseline build for the tests):
//   AVX-512F         16 lanes, 8-row tiles, fused multiply-add (_mm512_fmadd_ps)
//   AVX2 + FMA        8 lanes, 3-row tiles, fused multiply-add (_mm256_fmadd_ps)
//   AArch64           4 lanes, 3-row tiles, fused multiply-add (vfmaq_n_f32)
//   otherwise         4 lanes (SSE2 / any vector unit), 2-row tiles, a rounded product then a rounded sum
// Every path computes y[m, n] as the same chain over k, acc = fma(x[m, k], W[k, n], acc) from acc = 0 (or the
// rounded product and sum), whatever the tile, the row's place in it and the thread: a row's result does not depend
// on how many rows come with it (1 device or 8) nor on how panels are shared. The multiply-adds are written as
// intrinsics and the build passes -ffp-contract=off, so no tile shape is left to the compiler's contraction choice.
// Weights float32, or bfloat16 (widened in registers: half the bytes streamed); rows and results float32.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;  // columns per packed panel (the Python side packs with the same width)
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRows = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kRows = 3;
#elif defined(__aarch64__)
constexpr int kLanes = 4;
constexpr int kRows = 3;
#else
constexpr int kLanes = 4;
constexpr int kRows = 2;
#endif
constexpr int kVecs = kPanel / kLanes;
constexpr int kPrefetchRows = 24;  // panel rows (128 bytes each) prefetched ahead of the multiply

// The vector of kLanes floats and its four operations, per instruction set: Load a panel row's kLanes weights
// (bfloat16 is the upper half of a float32: widening is a zero-extension and a shift), MulAdd (acc + s * w,
// rounded once where there is a fused multiply-add: every tile the same instruction), Store, Zero. Loads and
// stores are intrinsics: through memcpy, GCC's Haswell tuning (-march=haswell) kept the accumulators on the stack.
#if defined(__AVX512F__)
typedef __m512 Vec;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec MulAdd(Vec acc, float s, Vec w) { return _mm512_fmadd_ps(_mm512_set1_ps(s), w, acc); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 Vec;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Load(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec MulAdd(Vec acc, float s, Vec w) { return _mm256_fmadd_ps(_mm256_set1_ps(s), w, acc); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#elif defined(__aarch64__)
typedef float32x4_t Vec;
inline Vec Zero() { return vdupq_n_f32(0.0f); }
inline Vec Load(const float* p) { return vld1q_f32(p); }
inline Vec Load(const uint16_t* p) { return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16(p)), 16)); }
inline Vec MulAdd(Vec acc, float s, Vec w) { return vfmaq_n_f32(acc, w, s); }
inline void Store(float* p, Vec v) { vst1q_f32(p, v); }
#else
typedef float Vec __attribute__((vector_size(kLanes * 4), aligned(4)));
inline Vec Zero() { return Vec{}; }
inline Vec Load(const float* p) {
  Vec w;
  std::memcpy(&w, p, sizeof(Vec));
  return w;
}
inline Vec Load(const uint16_t* p) {
  typedef uint16_t Half __attribute__((vector_size(kLanes * 2), aligned(2)));
  typedef uint32_t Wide __attribute__((vector_size(kLanes * 4)));
  Half h;
  std::memcpy(&h, p, sizeof(Half));
  const Wide u = __builtin_convertvector(h, Wide) << 16;
  Vec w;
  std::memcpy(&w, &u, sizeof(Vec));
  return w;
}
inline Vec MulAdd(Vec acc, float s, Vec w) { return acc + s * w; }  // -ffp-contract=off: two roundings, every tile
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
#endif

// R rows of float32 x (row stride ldx) times one panel [K, 32] -> R x 32 float32 outputs, the first `cols` of each
// written. T: the weight's float (float32) or uint16_t (bfloat16); float32 accumulation either way.
template <int R, typename T>
inline void Tile(const float* x, int64_t ldx, const T* panel, int64_t K, float* y, int64_t ldy, int cols) {
  Vec acc[R][kVecs];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = Zero();
  // 128 bytes of float32 panel row (64 of bfloat16): prefetch the same distance in bytes
  constexpr int kAhead = kPrefetchRows * 4 / static_cast<int>(sizeof(T));
  for (int64_t k = 0; k < K; ++k) {
    const T* row = panel + k * kPanel;
    for (int q = 0; q < kPanel; q += 64 / static_cast<int>(sizeof(T))) __builtin_prefetch(row + kAhead * kPanel + q);
    Vec w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = Load(row + j * kLanes);
    for (int i = 0; i < R; ++i) {
      const float s = x[i * ldx + k];
      for (int j = 0; j < kVecs; ++j) acc[i][j] = MulAdd(acc[i][j], s, w[j]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float out[kPanel];
    for (int j = 0; j < kVecs; ++j) Store(out + j * kLanes, acc[i][j]);
    std::memcpy(y + i * ldy, out, cols * sizeof(float));
  }
}

template <int R, typename T>
inline void TileUpTo(int rows, const float* x, int64_t ldx, const T* panel, int64_t K, float* y, int64_t ldy, int cols) {
  if constexpr (R > 0) {
    if (rows == R) return Tile<R>(x, ldx, panel, K, y, ldy, cols);
    return TileUpTo<R - 1>(rows, x, ldx, panel, K, y, ldy, cols);
  }
}

// Panels [p0, p1) for all M rows.
template <typename T>
void Panels(const float* x, const T* packed, float* y, int64_t M, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = packed + p * K * kPanel;
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
    for (int64_t m = 0; m < M; m += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m));
      TileUpTo<kRows>(rows, x + m * K, K, panel, K, y + m * N + p * kPanel, N, cols);
    }
  }
}

// Work shared between the calling thread and tasks on XLA's intra-op pool. The state lives on the heap and
// tasks hold it by shared_ptr: a task that starts after the caller has returned finds no chunk left and only
// drops its reference, so the caller never waits for a task to start (no deadlock when the pool is busy).
template <typename T>
struct Shared {
  const float* x;
  const T* packed;
  float* y;
  int64_t M, K, N, panels, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (;;) {
      const int64_t p0 = next.fetch_add(chunk);
      if (p0 >= panels) return;
      const int64_t p1 = std::min(panels, p0 + chunk);
      Panels(x, packed, y, M, K, N, p0, p1);
      done.fetch_add(p1 - p0, std::memory_order_release);
    }
  }
};

template <ffi::DataType D>
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> packed,
                        ffi::ResultBuffer<ffi::F32> y) {
  using T = ffi::NativeType<D>;
  const auto xd = x.dimensions();
  const auto wd = packed.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2)
    return ffi::Error::InvalidArgument("packed_matmul: x [M, K], packed [P, K, 32] and y [M, N] expected");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  if (wd[2] != kPanel || wd[1] != K || yd[0] != M || wd[0] * kPanel < N || (wd[0] - 1) * kPanel >= N)
    return ffi::Error::InvalidArgument("packed_matmul: shapes do not match a [K, N] weight packed in 32 columns");
  const int64_t panels = wd[0];
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(y->typed_data(), 0, M * N * sizeof(float));
    return ffi::Error::Success();
  }
  const float* xs = x.typed_data();
  const T* ws = reinterpret_cast<const T*>(packed.typed_data());
  const int64_t threads = std::min<int64_t>(pool.num_threads(), panels);
  if (threads <= 1) {
    Panels(xs, ws, y->typed_data(), M, K, N, 0, panels);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared<T>>();
  shared->x = xs;
  shared->packed = ws;
  shared->y = y->typed_data();
  shared->M = M;
  shared->K = K;
  shared->N = N;
  shared->panels = panels;
  shared->chunk = std::max<int64_t>(1, panels / (4 * threads));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < panels) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

// float32 x times float32 or bfloat16 weights -> float32 (accumulated in float32; the caller rounds). x comes in
// float32 even in a bfloat16 model (XLA converts it in the fusion before): broadcasting a bfloat16 scalar costs
// four instructions per row and step of k where a float32 one costs one.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PoerPackedMatmulF32, PackedMatmul<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PoerPackedMatmulBF16, PackedMatmul<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
