// Hand-written CPU kernels that jaxreg's jitted programs call through XLA's FFI (see cpu_kernels.py).
//
// jaxreg_trilinear: the trilinear value of a volume at x + disp(x) and its derivative along each
// axis, from one read of the eight corners. XLA's CPU gather copies element by element and the
// corner index it needs is itself a full-size pass; this loop does both in one sweep.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(begin, end) over [0, n) in chunks on the caller and on XLA's intra-op thread pool. The
// caller claims chunks too, so the call completes even when no pool thread is free.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunk, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();  // outlives this call if a helper starts late
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto work = [state, n, chunk, chunks, body]() {
    for (;;) {
      const int64_t c = state->next.fetch_add(1);
      if (c >= chunks) return;
      body(c * chunk, std::min(n, (c + 1) * chunk));
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

// The trilinear value of corners s (index 4a + 2b + e for offsets (a, b, e)) at fractions
// (fx, fy, fz), and its derivative along each axis, written `stride` apart from `slope`.
inline void Combine(const float* s, float fx, float fy, float fz, float* value, float* slope,
                    int64_t stride) {
  const float dz00 = s[1] - s[0], dz01 = s[3] - s[2], dz10 = s[5] - s[4], dz11 = s[7] - s[6];
  const float c00 = s[0] + fz * dz00, c01 = s[2] + fz * dz01;
  const float c10 = s[4] + fz * dz10, c11 = s[6] + fz * dz11;
  const float dy0 = c01 - c00, dy1 = c11 - c10;
  const float c0 = c00 + fy * dy0, c1 = c10 + fy * dy1;
  const float dz0 = dz00 + fy * (dz01 - dz00), dz1 = dz10 + fy * (dz11 - dz10);
  *value = c0 + fx * (c1 - c0);
  slope[0] = c1 - c0;
  slope[stride] = dy0 + fx * (dy1 - dy0);
  slope[2 * stride] = dz0 + fx * (dz1 - dz0);
}

// value (X,Y,Z,C) and slopes (3,X,Y,Z,C) of volume (VX,VY,VZ,C) at x + disp(x); disp (3,X,Y,Z) in
// voxels. Corners outside the volume count as 0 (jaxreg.warp's "zeros" mode); a non-finite
// displacement gives NaN. kChannels > 0 fixes C at compile time (0: read it from the shape).
template <int64_t kChannels>
ffi::Error Trilinear(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& disp, ffi::Buffer<ffi::F32>& volume,
                     ffi::ResultBuffer<ffi::F32>& value, ffi::ResultBuffer<ffi::F32>& slopes) {
  const auto d = disp.dimensions();
  const auto v = volume.dimensions();
  const int64_t X = d[1], Y = d[2], Z = d[3], N = X * Y * Z;
  const int64_t VX = v[0], VY = v[1], VZ = v[2];
  const int64_t C = kChannels > 0 ? kChannels : (v.size() > 3 ? v[3] : 1);
  const int64_t sz = C, sy = VZ * C, sx = VY * VZ * C;  // corner strides in the volume
  const float* u = disp.typed_data();
  const float* vol = volume.typed_data();
  float* out = value->typed_data();
  float* slope = slopes->typed_data();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    for (int64_t xy = begin; xy < end; ++xy) {
      const float x = static_cast<float>(xy / Y), y = static_cast<float>(xy % Y);
      const float* ux = u + xy * Z;
      const float* uy = ux + N;
      const float* uz = uy + N;
      for (int64_t z = 0; z < Z; ++z) {
        const int64_t at = (xy * Z + z) * C;
        const float px = x + ux[z], py = y + uy[z], pz = static_cast<float>(z) + uz[z];
        if (!(std::isfinite(px) && std::isfinite(py) && std::isfinite(pz))) {
          for (int64_t c = 0; c < C; ++c) {
            out[at + c] = slope[at + c] = slope[N * C + at + c] = slope[2 * N * C + at + c] = nan;
          }
          continue;
        }
        const float lx = std::floor(px), ly = std::floor(py), lz = std::floor(pz);
        const float fx = px - lx, fy = py - ly, fz = pz - lz;
        float s[8];
        if (lx >= 0.f && lx <= VX - 2 && ly >= 0.f && ly <= VY - 2 && lz >= 0.f && lz <= VZ - 2) {
          const float* corner = vol + ((static_cast<int64_t>(lx) * VY + static_cast<int64_t>(ly)) * VZ +
                                       static_cast<int64_t>(lz)) * C;
          for (int64_t c = 0; c < C; ++c, ++corner) {
            s[0] = corner[0], s[1] = corner[sz], s[2] = corner[sy], s[3] = corner[sy + sz];
            s[4] = corner[sx], s[5] = corner[sx + sz], s[6] = corner[sx + sy], s[7] = corner[sx + sy + sz];
            Combine(s, fx, fy, fz, out + at + c, slope + at + c, N * C);
          }
          continue;
        }
        // Near or past the edge: clamp far-away corners to just outside, then test each one.
        const int64_t i0 = static_cast<int64_t>(std::clamp(lx, -2.f, static_cast<float>(VX)));
        const int64_t j0 = static_cast<int64_t>(std::clamp(ly, -2.f, static_cast<float>(VY)));
        const int64_t k0 = static_cast<int64_t>(std::clamp(lz, -2.f, static_cast<float>(VZ)));
        for (int64_t c = 0; c < C; ++c) {
          for (int q = 0; q < 8; ++q) {
            const int64_t i = i0 + (q >> 2), j = j0 + ((q >> 1) & 1), k = k0 + (q & 1);
            const bool inside = i >= 0 && i < VX && j >= 0 && j < VY && k >= 0 && k < VZ;
            s[q] = inside ? vol[((i * VY + j) * VZ + k) * C + c] : 0.f;
          }
          Combine(s, fx, fy, fz, out + at + c, slope + at + c, N * C);
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error TrilinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, ffi::Buffer<ffi::F32> volume,
                         ffi::ResultBuffer<ffi::F32> value, ffi::ResultBuffer<ffi::F32> slopes) {
  if (disp.dimensions().size() != 4 || disp.dimensions()[0] != 3 || volume.dimensions().size() < 3 ||
      volume.dimensions().size() > 4) {
    return ffi::Error::InvalidArgument("jaxreg_trilinear: disp must be (3,X,Y,Z), volume (X,Y,Z[,C])");
  }
  const bool one_channel = volume.dimensions().size() == 3 || volume.dimensions()[3] == 1;
  return one_channel ? Trilinear<1>(pool, disp, volume, value, slopes)
                     : Trilinear<0>(pool, disp, volume, value, slopes);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregTrilinear, TrilinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
