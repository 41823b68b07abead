// y[M, N] = x[M, K] @ W[K, N] on CPU, with W pre-packed in column panels: packed[p, k, j] = W[k, 32 p + j]
// (N padded with zeros to a multiple of 32). See packed_matmul.py for why and when the sampler uses it.
//
// A decode step multiplies a few rows (the slots of a device) by every weight of the model once: the step
// streams the weights from memory, and XLA:CPU's Eigen GEMM packs each weight panel anew on every call (an
// extra pass over the weights, measured ~30 GFLOP/s at 8 rows on the h896 shapes). Packed once per weight
// update, each panel is one contiguous stream: read once per row block, prefetched ahead, multiplied into a
// register tile of ROWS x 32 accumulators.
//
// Built at first use by packed_matmul.py with the host's compiler and -march=native; the vector type follows
// the instruction set the compiler targets (AVX-512: 8-row tiles in 2 zmm per row; otherwise 3-row tiles).
// Weights float32, or bfloat16 (widened in registers: half the bytes streamed); rows and results float32.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;  // columns per packed panel (the Python side packs with the same width)
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRows = 8;
#else
constexpr int kLanes = 8;
constexpr int kRows = 3;
#endif
constexpr int kVecs = kPanel / kLanes;
constexpr int kPrefetchRows = 24;  // panel rows (128 bytes each) prefetched ahead of the multiply

typedef float Vec __attribute__((vector_size(kLanes * 4), aligned(4)));

// bfloat16 is the upper half of a float32: widening a panel row is a zero-extension and a shift.
inline Vec LoadPanelRow(const float* p) {
  Vec w;
  std::memcpy(&w, p, sizeof(Vec));
  return w;
}
inline Vec LoadPanelRow(const uint16_t* p) {
  typedef uint16_t Half __attribute__((vector_size(kLanes * 2), aligned(2)));
  typedef uint32_t Wide __attribute__((vector_size(kLanes * 4)));
  Half h;
  std::memcpy(&h, p, sizeof(Half));
  const Wide u = __builtin_convertvector(h, Wide) << 16;
  Vec w;
  std::memcpy(&w, &u, sizeof(Vec));
  return w;
}

// R rows of float32 x (row stride ldx) times one panel [K, 32] -> R x 32 float32 outputs, the first `cols` of each
// written. T: the weight's float (float32) or uint16_t (bfloat16); float32 accumulation either way.
template <int R, typename T>
inline void Tile(const float* x, int64_t ldx, const T* panel, int64_t K, float* y, int64_t ldy, int cols) {
  Vec acc[R][kVecs];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = Vec{};
  // 128 bytes of float32 panel row (64 of bfloat16): prefetch the same distance in bytes
  constexpr int kAhead = kPrefetchRows * 4 / static_cast<int>(sizeof(T));
  for (int64_t k = 0; k < K; ++k) {
    const T* row = panel + k * kPanel;
    for (int q = 0; q < kPanel; q += 64 / static_cast<int>(sizeof(T))) __builtin_prefetch(row + kAhead * kPanel + q);
    Vec w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = LoadPanelRow(row + j * kLanes);
    for (int i = 0; i < R; ++i) {
      const float s = x[i * ldx + k];
      for (int j = 0; j < kVecs; ++j) acc[i][j] += s * w[j];
    }
  }
  for (int i = 0; i < R; ++i) {
    float out[kPanel];
    std::memcpy(out, acc[i], sizeof(out));
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
