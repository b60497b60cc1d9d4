// Hand-written CPU kernels that jaxreg's jitted programs call through XLA's FFI (see cpu_kernels.py).
//
// jaxreg_trilinear: the trilinear value of a volume at x + disp(x) and its derivative along each
// axis, from one read of the eight corners. XLA's CPU gather copies element by element and the
// corner index it needs is itself a full-size pass; this loop does both in one sweep.
//
// jaxreg_fold: the fold penalty relu(margin - det J)^2 per voxel and its gradient. XLA evaluates
// the cofactors and their nine fluxes at every voxel; they are non-zero only where det J < margin,
// a small fraction of the grid, so this kernel computes them there alone.
//
// jaxreg_box: a centred box average along any of the three spatial axes, zero or edge padded. XLA
// makes three passes over memory (one per axis); this kernel filters each plane along y and z in
// cache and sums planes along x from a ring of filtered planes: one read and one write.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

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


// J's row a at voxel (x, y, z): the forward difference of the three components along axis a, plus
// e_a. Only called inside the common interior (no index past the end).
inline void Rows(const float* u, int64_t N, int64_t v, const int64_t step[3], float r[3][3]) {
  for (int a = 0; a < 3; ++a) {
    for (int c = 0; c < 3; ++c) r[a][c] = u[c * N + v + step[a]] - u[c * N + v] + (a == c ? 1.f : 0.f);
  }
}

// det(J) expanded along the first column in the official evaluator's order (as jacobians.det3).
inline float Det(const float r[3][3]) {
  return r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[1][0] * (r[0][1] * r[2][2] - r[0][2] * r[2][1]) +
         r[2][0] * (r[0][1] * r[1][2] - r[0][2] * r[1][1]);
}

// shortfall (X,Y,Z) = relu(margin - det J) on the common interior (0 on each axis's last slab), and
// the gradient (3,X,Y,Z) of mean(shortfall^2) over the interior wrt disp (3,X,Y,Z). With
// F_a = -2 shortfall / count * (cofactor row a), gradient_c(v) = sum_a F_a,c(v - e_a) - F_a,c(v):
// the transpose of a forward difference is a backward one. Two sweeps, each race-free.
ffi::Error FoldImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, float margin,
                    ffi::ResultBuffer<ffi::F32> shortfall, ffi::ResultBuffer<ffi::F32> gradient) {
  const auto d = disp.dimensions();
  if (d.size() != 4 || d[0] != 3) return ffi::Error::InvalidArgument("jaxreg_fold: disp must be (3,X,Y,Z)");
  const int64_t X = d[1], Y = d[2], Z = d[3], N = X * Y * Z;
  const int64_t step[3] = {Y * Z, Z, 1};
  const float scale = -2.f / static_cast<float>((X - 1) * (Y - 1) * (Z - 1));
  const float* u = disp.typed_data();
  float* s = shortfall->typed_data();
  float* g = gradient->typed_data();
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    for (int64_t xy = begin; xy < end; ++xy) {
      const int64_t x = xy / Y, y = xy % Y;
      for (int64_t z = 0; z < Z; ++z) {
        const int64_t v = xy * Z + z;
        float value = 0.f;
        if (x < X - 1 && y < Y - 1 && z < Z - 1) {
          float r[3][3];
          Rows(u, N, v, step, r);
          value = std::max(margin - Det(r), 0.f);
        }
        s[v] = value;
      }
    }
  });
  // F_a at voxel w (only called where its shortfall is positive, hence inside the interior)
  auto flux = [=](int64_t w, int a, float out[3]) {
    float r[3][3];
    Rows(u, N, w, step, r);
    const int b = (a + 1) % 3, e = (a + 2) % 3;  // cofactor row a = row b x row e
    const float weight = scale * s[w];
    out[0] = weight * (r[b][1] * r[e][2] - r[b][2] * r[e][1]);
    out[1] = weight * (r[b][2] * r[e][0] - r[b][0] * r[e][2]);
    out[2] = weight * (r[b][0] * r[e][1] - r[b][1] * r[e][0]);
  };
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    for (int64_t xy = begin; xy < end; ++xy) {
      const int64_t position[2] = {xy / Y, xy % Y};
      for (int64_t z = 0; z < Z; ++z) {
        const int64_t v = xy * Z + z;
        const int64_t coordinate[3] = {position[0], position[1], z};
        float total[3] = {0.f, 0.f, 0.f}, f[3];
        for (int a = 0; a < 3; ++a) {
          if (s[v] > 0.f) {
            flux(v, a, f);
            for (int c = 0; c < 3; ++c) total[c] -= f[c];
          }
          if (coordinate[a] > 0 && s[v - step[a]] > 0.f) {
            flux(v - step[a], a, f);
            for (int c = 0; c < 3; ++c) total[c] += f[c];
          }
        }
        for (int c = 0; c < 3; ++c) g[c * N + v] = total[c];
      }
    }
  });
  return ffi::Error::Success();
}

// out[i] = scale * sum over k in [0, 2r] of in[i * width + k * width + w] for w < width: a window sum
// along rows of `width` values (width 1: along one row). `in` holds n + 2r rows, padding included.
inline void WindowSum(const float* in, float* out, int64_t n, int r, int64_t width, float scale) {
  const int64_t count = n * width;
  std::copy(in, in + count, out);
  for (int k = 1; k <= 2 * r; ++k) {
    const float* q = in + k * width;
    for (int64_t i = 0; i < count; ++i) out[i] += q[i];
  }
  if (r > 0) {
    for (int64_t i = 0; i < count; ++i) out[i] *= scale;
  }
}

// x (B,X,Y,Z) -> the same shape, box-averaged with half-width r along the axes whose bit is set in
// `axes` (1: X, 2: Y, 4: Z); `edge` replicates the border, otherwise zeros pad it.
ffi::Error BoxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> input, int32_t size, int32_t axes, int32_t edge,
                   ffi::ResultBuffer<ffi::F32> output) {
  const auto d = input.dimensions();
  if (d.size() != 4 || size < 1 || size % 2 != 1) {
    return ffi::Error::InvalidArgument("jaxreg_box: input must be (B,X,Y,Z) and size odd");
  }
  const int64_t B = d[0], X = d[1], Y = d[2], Z = d[3], plane = Y * Z;
  const int rx = (axes & 1) ? size / 2 : 0, ry = (axes & 2) ? size / 2 : 0, rz = (axes & 4) ? size / 2 : 0;
  const float sx = (axes & 1) ? 1.f / size : 1.f, sy = (axes & 2) ? 1.f / size : 1.f, sz = (axes & 4) ? 1.f / size : 1.f;
  const float* in = input.typed_data();
  float* out = output->typed_data();
  const int64_t chunk = 16;  // output planes per task; each task also filters 2 rx planes of margin
  const int64_t chunks_per_volume = (X + chunk - 1) / chunk;
  ParallelFor(pool, B * chunks_per_volume, 1, [=](int64_t begin, int64_t end) {
    const int ring_size = 2 * rx + 1;
    std::vector<float> ring(ring_size * plane), padded_rows((Y + 2 * ry) * Z), padded_row(Z + 2 * rz);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks_per_volume, x0 = (task % chunks_per_volume) * chunk;
      const int64_t x1 = std::min(X, x0 + chunk);
      const float* volume = in + b * X * plane;
      // the y and z filtered plane p (edge: clamped into the volume; zeros: 0 outside) into its slot
      auto filter_plane = [&](int64_t p) {
        float* slot = ring.data() + ((p + ring_size * X) % ring_size) * plane;
        if (p < 0 || p >= X) {
          if (!edge) {
            std::fill(slot, slot + plane, 0.f);
            return;
          }
          p = std::clamp<int64_t>(p, 0, X - 1);
        }
        const float* source = volume + p * plane;
        for (int64_t y = 0; y < Y; ++y) {
          const float* row = source + y * Z;
          std::copy(row, row + Z, padded_row.begin() + rz);
          for (int k = 0; k < rz; ++k) {
            padded_row[k] = edge ? row[0] : 0.f;
            padded_row[rz + Z + k] = edge ? row[Z - 1] : 0.f;
          }
          WindowSum(padded_row.data(), padded_rows.data() + (y + ry) * Z, Z, rz, 1, sz);
        }
        for (int k = 0; k < ry; ++k) {
          float* top = padded_rows.data() + k * Z;
          float* bottom = padded_rows.data() + (ry + Y + k) * Z;
          if (edge) {
            std::copy(padded_rows.data() + ry * Z, padded_rows.data() + (ry + 1) * Z, top);
            std::copy(padded_rows.data() + (ry + Y - 1) * Z, padded_rows.data() + (ry + Y) * Z, bottom);
          } else {
            std::fill(top, top + Z, 0.f);
            std::fill(bottom, bottom + Z, 0.f);
          }
        }
        WindowSum(padded_rows.data(), slot, Y, ry, Z, sy);
      };
      for (int64_t p = x0 - rx; p < x0 + rx; ++p) filter_plane(p);
      for (int64_t x = x0; x < x1; ++x) {
        filter_plane(x + rx);
        float* o = out + (b * X + x) * plane;
        const float* first = ring.data() + ((x - rx + ring_size * X) % ring_size) * plane;
        std::copy(first, first + plane, o);
        for (int k = -rx + 1; k <= rx; ++k) {
          const float* q = ring.data() + ((x + k + ring_size * X) % ring_size) * plane;
          for (int64_t i = 0; i < plane; ++i) o[i] += q[i];
        }
        if (rx > 0) {
          for (int64_t i = 0; i < plane; ++i) o[i] *= sx;
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregTrilinear, TrilinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregFold, FoldImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("margin")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregBox, BoxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("size")
                                  .Attr<int32_t>("axes")
                                  .Attr<int32_t>("edge")
                                  .Ret<ffi::Buffer<ffi::F32>>());
