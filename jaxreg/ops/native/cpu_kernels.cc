// Hand-written CPU kernels that jaxreg's jitted programs call through XLA's FFI (see cpu_kernels.py).
//
// jaxreg_trilinear: the trilinear value of a one-channel volume at x + disp(x) and its derivative
// along each axis, from one read of the eight corners. XLA's CPU gather copies element by element and the
// corner index it needs is itself a full-size pass; this loop does both in one sweep.
//
// jaxreg_warped_ssd: the feature level's SSD and its gradient from the same samples, reduced over
// the channels in the loop: the warped channels and their slopes (4 x 13 channels) are never written.
//
// jaxreg_fold: the fold penalty relu(margin - det J)^2 per voxel and its gradient. XLA evaluates
// the cofactors and their nine fluxes at every voxel; they are non-zero only where det J < margin,
// a small fraction of the grid, so this kernel computes them there alone.
//
// jaxreg_fold_mask: the voxels where one of LUMIR's ten digital Jacobians is negative (XLA formed the
// ten determinants as separate full-size passes).
//
// jaxreg_unfold: the whole fold repair (jaxreg.stages.unfold) in one call. Its rounds touch only the rows
// near folding voxels, where XLA's loop smoothed and re-masked the whole field every round.
//
// jaxreg_cost_volume: the coarse search's matching cost of every candidate offset, row by row with the
// row's features in cache (XLA re-read both feature stacks from memory for each of the 125 offsets).
//
// jaxreg_coupled_argmin: the coarse search's per-cell argmin over the candidates, in one pass over
// the cost volume (XLA's loop over the candidates made several full passes per candidate).
//
// jaxreg_sample: warp.warp and warp.warp_field, trilinear values only (one or three channels,
// zero or border padding), for the inverse consistency's field warps and the image warps.
//
// jaxreg_mind: MIND-SSC pooled (features.mind_ssc_pooled) in two sweeps over the image, each
// plane's twelve patch SSDs filtered in cache: XLA stored the full-resolution SSD stack and read it
// back three times.
//
// jaxreg_lncc: the full-resolution level's local NCC and its derivative (refine._lncc_and_derivative)
// in strips swept plane by plane: the local sums, the per-voxel terms and the sums of their
// derivatives stay in two rings of planes, where XLA wrote two stacks of 3 and 4 full-size channels
// and read them back.
//
// jaxreg_box: a centred box average along any of the three spatial axes, zero or edge padded. XLA
// makes three passes over memory (one per axis); this kernel filters each plane along y and z in
// cache and sums planes along x from a ring of filtered planes: one read and one write.
//
// jaxreg_box_adam: the last box filter of an Adam step on smoothed parameters (refine._adam) and
// the Adam update, plane by plane: XLA wrote the filtered gradient, then read it, both moments and
// the parameters in three passes.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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
// (fx, fy, fz), and its derivative along each axis. Inlined into vectorised loops.
inline void Interpolate(const float s[8], float fx, float fy, float fz, float& value, float& dx, float& dy,
                        float& dz) {
  const float dz00 = s[1] - s[0], dz01 = s[3] - s[2], dz10 = s[5] - s[4], dz11 = s[7] - s[6];
  const float c00 = s[0] + fz * dz00, c01 = s[2] + fz * dz01;
  const float c10 = s[4] + fz * dz10, c11 = s[6] + fz * dz11;
  const float dy0 = c01 - c00, dy1 = c11 - c10;
  const float c0 = c00 + fy * dy0, c1 = c10 + fy * dy1;
  const float dz0 = dz00 + fy * (dz01 - dz00), dz1 = dz10 + fy * (dz11 - dz10);
  value = c0 + fx * (c1 - c0);
  dx = c1 - c0;
  dy = dy0 + fx * (dy1 - dy0);
  dz = dz0 + fx * (dz1 - dz0);
}

// Channel c of the eight corners (index 4a + 2b + e) of the cell whose low corner is (lx, ly, lz),
// for a cell near or past the edge of volume (VX,VY,VZ,C): corners outside count as 0. Far-away
// low corners are clamped to just outside first (the float to int conversion stays defined).
inline void CornersNearEdge(const float* vol, int64_t VX, int64_t VY, int64_t VZ, int64_t C, int64_t c, float lx,
                            float ly, float lz, float s[8]) {
  const int64_t i0 = static_cast<int64_t>(std::clamp(lx, -2.f, static_cast<float>(VX)));
  const int64_t j0 = static_cast<int64_t>(std::clamp(ly, -2.f, static_cast<float>(VY)));
  const int64_t k0 = static_cast<int64_t>(std::clamp(lz, -2.f, static_cast<float>(VZ)));
  for (int q = 0; q < 8; ++q) {
    const int64_t i = i0 + (q >> 2), j = j0 + ((q >> 1) & 1), k = k0 + (q & 1);
    const bool inside = i >= 0 && i < VX && j >= 0 && j < VY && k >= 0 && k < VZ;
    s[q] = inside ? vol[((i * VY + j) * VZ + k) * C + c] : 0.f;
  }
}

// Where a point falls in a volume whose last corner is (top_x, top_y, top_z), its rows vy, vz long:
// the fractions within its cell, the flat indices of the cell's eight corners (4a + 2b + e) clamped
// into the volume, and per corner 1 when it is inside (with border padding, always: the point was
// clamped into the volume first) or 0. Written without branches so that the loops calling it
// vectorise with gathers; points far outside (zero padding) are pulled to 4 voxels out, where every
// corner stays outside, and floored by an int32 round trip (std::floor is a library call without
// SSE4.1, which stops vectorisation). A non-finite point (Finite) is located as the origin.
struct Cell {
  float fx, fy, fz;
  int32_t at[8];
  float inside[8];
};

inline bool Finite(float px, float py, float pz) { return (px - px == 0.f) & (py - py == 0.f) & (pz - pz == 0.f); }

// (always inlined: a call returns the cell through memory, which stops vectorisation)
template <bool kBorder>
__attribute__((always_inline)) inline Cell LocateCell(float px, float py, float pz, bool finite, float top_x,
                                                      float top_y, float top_z, int32_t vy, int32_t vz) {
  Cell cell;
  const float low_end = kBorder ? 0.f : -4.f, high_end = kBorder ? 0.f : 4.f;
  const float qx = std::min(std::max(finite ? px : 0.f, low_end), top_x + high_end);
  const float qy = std::min(std::max(finite ? py : 0.f, low_end), top_y + high_end);
  const float qz = std::min(std::max(finite ? pz : 0.f, low_end), top_z + high_end);
  const float tx = static_cast<float>(static_cast<int32_t>(qx)), ty = static_cast<float>(static_cast<int32_t>(qy));
  const float tz = static_cast<float>(static_cast<int32_t>(qz));
  const float lx = tx - (tx > qx ? 1.f : 0.f), ly = ty - (ty > qy ? 1.f : 0.f), lz = tz - (tz > qz ? 1.f : 0.f);
  cell.fx = qx - lx, cell.fy = qy - ly, cell.fz = qz - lz;
  // per axis: is the low / high corner inside, and its index clamped into the volume
  const float in_x0 = kBorder ? 1.f : (lx >= 0.f) & (lx <= top_x), in_x1 = kBorder ? 1.f : (lx >= -1.f) & (lx <= top_x - 1.f);
  const float in_y0 = kBorder ? 1.f : (ly >= 0.f) & (ly <= top_y), in_y1 = kBorder ? 1.f : (ly >= -1.f) & (ly <= top_y - 1.f);
  const float in_z0 = kBorder ? 1.f : (lz >= 0.f) & (lz <= top_z), in_z1 = kBorder ? 1.f : (lz >= -1.f) & (lz <= top_z - 1.f);
  const int32_t x0 = static_cast<int32_t>(std::min(std::max(lx, 0.f), top_x));
  const int32_t x1 = static_cast<int32_t>(std::min(std::max(lx + 1.f, 0.f), top_x));
  const int32_t y0 = static_cast<int32_t>(std::min(std::max(ly, 0.f), top_y));
  const int32_t y1 = static_cast<int32_t>(std::min(std::max(ly + 1.f, 0.f), top_y));
  const int32_t z0 = static_cast<int32_t>(std::min(std::max(lz, 0.f), top_z));
  const int32_t z1 = static_cast<int32_t>(std::min(std::max(lz + 1.f, 0.f), top_z));
  const int32_t r00 = (x0 * vy + y0) * vz, r01 = (x0 * vy + y1) * vz, r10 = (x1 * vy + y0) * vz, r11 = (x1 * vy + y1) * vz;
  cell.at[0] = r00 + z0, cell.at[1] = r00 + z1, cell.at[2] = r01 + z0, cell.at[3] = r01 + z1;
  cell.at[4] = r10 + z0, cell.at[5] = r10 + z1, cell.at[6] = r11 + z0, cell.at[7] = r11 + z1;
  cell.inside[0] = in_x0 * in_y0 * in_z0, cell.inside[1] = in_x0 * in_y0 * in_z1;
  cell.inside[2] = in_x0 * in_y1 * in_z0, cell.inside[3] = in_x0 * in_y1 * in_z1;
  cell.inside[4] = in_x1 * in_y0 * in_z0, cell.inside[5] = in_x1 * in_y0 * in_z1;
  cell.inside[6] = in_x1 * in_y1 * in_z0, cell.inside[7] = in_x1 * in_y1 * in_z1;
  return cell;
}

// One row (fixed x, y) of the one-channel case (zero padding): corners outside count as 0.
void TrilinearRow(const float* __restrict__ ux, const float* __restrict__ uy,
                                const float* __restrict__ uz, float x, float y, int64_t Z,
                                const float* __restrict__ vol, int64_t VX, int64_t VY, int64_t VZ,
                                float* __restrict__ value, float* __restrict__ slope_x,
                                float* __restrict__ slope_y, float* __restrict__ slope_z) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float top_x = static_cast<float>(VX - 1), top_y = static_cast<float>(VY - 1), top_z = static_cast<float>(VZ - 1);
  const int32_t vy = static_cast<int32_t>(VY), vz = static_cast<int32_t>(VZ);  // volumes under 2^31 voxels
  for (int32_t z = 0; z < static_cast<int32_t>(Z); ++z) {
    const float px = x + ux[z], py = y + uy[z], pz = static_cast<float>(z) + uz[z];
    const bool finite = Finite(px, py, pz);
    const Cell c = LocateCell<false>(px, py, pz, finite, top_x, top_y, top_z, vy, vz);
    const float s[8] = {vol[c.at[0]] * c.inside[0], vol[c.at[1]] * c.inside[1], vol[c.at[2]] * c.inside[2],
                        vol[c.at[3]] * c.inside[3], vol[c.at[4]] * c.inside[4], vol[c.at[5]] * c.inside[5],
                        vol[c.at[6]] * c.inside[6], vol[c.at[7]] * c.inside[7]};
    float v, dx, dy, dz;
    Interpolate(s, c.fx, c.fy, c.fz, v, dx, dy, dz);
    value[z] = finite ? v : nan;
    slope_x[z] = finite ? dx : nan;
    slope_y[z] = finite ? dy : nan;
    slope_z[z] = finite ? dz : nan;
  }
}

constexpr int64_t kMaxChannels = 64;

// The eight corners of channel c..c+C of `vol` around the point whose low corner is `corner`
// (inside the volume), combined per channel: value and derivative along each axis.
void CombineChannels(const float* __restrict__ corner, int64_t C, int64_t sx, int64_t sy, int64_t sz, float fx,
                     float fy, float fz, float* __restrict__ value, float* __restrict__ dx, float* __restrict__ dy,
                     float* __restrict__ dz) {
  for (int64_t c = 0; c < C; ++c) {
    const float s[8] = {corner[c], corner[sz + c], corner[sy + c], corner[sy + sz + c],
                        corner[sx + c], corner[sx + sz + c], corner[sx + sy + c], corner[sx + sy + sz + c]};
    Interpolate(s, fx, fy, fz, value[c], dx[c], dy[c], dz[c]);
  }
}

// The feature SSD's integrand and gradient without writing the warped channels:
// loss (X,Y,Z) = sum_c (m_c(x + disp) - f_c(x))^2 and gradient (3,X,Y,Z) = 2 sum_c (m_c - f_c) d m_c / d x_a,
// for moving and fixed (X,Y,Z,C), C <= 64, zeros outside; NaN for a non-finite displacement.
ffi::Error WarpedSsdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, ffi::Buffer<ffi::F32> moving,
                         ffi::Buffer<ffi::F32> fixed, ffi::ResultBuffer<ffi::F32> loss,
                         ffi::ResultBuffer<ffi::F32> gradient) {
  const auto d = disp.dimensions();
  const auto m = moving.dimensions();
  if (d.size() != 4 || d[0] != 3 || m.size() != 4 || m[3] > kMaxChannels) {
    return ffi::Error::InvalidArgument("jaxreg_warped_ssd: disp (3,X,Y,Z), moving and fixed (X,Y,Z,C<=64)");
  }
  const int64_t X = d[1], Y = d[2], Z = d[3], N = X * Y * Z;
  const int64_t VX = m[0], VY = m[1], VZ = m[2], C = m[3];
  const int64_t sz = C, sy = VZ * C, sx = VY * VZ * C;
  const float* u = disp.typed_data();
  const float* vol = moving.typed_data();
  const float* target = fixed.typed_data();
  float* out = loss->typed_data();
  float* g = gradient->typed_data();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    float value[kMaxChannels], dx[kMaxChannels], dy[kMaxChannels], dz[kMaxChannels], s[8];
    for (int64_t xy = begin; xy < end; ++xy) {
      const float x = static_cast<float>(xy / Y), y = static_cast<float>(xy % Y);
      for (int64_t z = 0; z < Z; ++z) {
        const int64_t v = xy * Z + z;
        const float px = x + u[v], py = y + u[N + v], pz = static_cast<float>(z) + u[2 * N + v];
        if (!(std::isfinite(px) && std::isfinite(py) && std::isfinite(pz))) {
          out[v] = g[v] = g[N + v] = g[2 * N + v] = nan;
          continue;
        }
        const float lx = std::floor(px), ly = std::floor(py), lz = std::floor(pz);
        const float fx = px - lx, fy = py - ly, fz = pz - lz;
        if (lx >= 0.f && lx <= VX - 2 && ly >= 0.f && ly <= VY - 2 && lz >= 0.f && lz <= VZ - 2) {
          const float* corner = vol + ((static_cast<int64_t>(lx) * VY + static_cast<int64_t>(ly)) * VZ +
                                       static_cast<int64_t>(lz)) * C;
          CombineChannels(corner, C, sx, sy, sz, fx, fy, fz, value, dx, dy, dz);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            CornersNearEdge(vol, VX, VY, VZ, C, c, lx, ly, lz, s);
            Interpolate(s, fx, fy, fz, value[c], dx[c], dy[c], dz[c]);
          }
        }
        const float* f = target + v * C;
        float total = 0.f, g0 = 0.f, g1 = 0.f, g2 = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float r = value[c] - f[c];
          total += r * r;
          g0 += r * dx[c], g1 += r * dy[c], g2 += r * dz[c];
        }
        out[v] = total;
        g[v] = 2.f * g0, g[N + v] = 2.f * g1, g[2 * N + v] = 2.f * g2;
      }
    }
  });
  return ffi::Error::Success();
}

// value (X,Y,Z) and slopes (3,X,Y,Z) of a one-channel volume (VX,VY,VZ) at x + disp(x); disp
// (3,X,Y,Z) in voxels. Corners outside the volume count as 0 (jaxreg.ops.warp's "zeros" mode); a
// non-finite displacement gives NaN. (Several channels: jaxreg_warped_ssd reduces them in its loop.)
ffi::Error TrilinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, ffi::Buffer<ffi::F32> volume,
                         ffi::ResultBuffer<ffi::F32> value, ffi::ResultBuffer<ffi::F32> slopes) {
  const auto d = disp.dimensions();
  const auto v = volume.dimensions();
  if (d.size() != 4 || d[0] != 3 || v.size() != 3) {
    return ffi::Error::InvalidArgument("jaxreg_trilinear: disp must be (3,X,Y,Z), volume (X,Y,Z)");
  }
  const int64_t X = d[1], Y = d[2], Z = d[3], N = X * Y * Z;
  const float* u = disp.typed_data();
  const float* vol = volume.typed_data();
  float* out = value->typed_data();
  float* slope = slopes->typed_data();
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    for (int64_t xy = begin; xy < end; ++xy) {
      const float* ux = u + xy * Z;
      float* row_slope = slope + xy * Z;
      TrilinearRow(ux, ux + N, ux + 2 * N, static_cast<float>(xy / Y), static_cast<float>(xy % Y), Z, vol, v[0], v[1],
                   v[2], out + xy * Z, row_slope, row_slope + N, row_slope + 2 * N);
    }
  });
  return ffi::Error::Success();
}

// One row (x, y) of warp.sample at (x, y, z) + disp: volume (C, VX, VY, VZ) channels first, out
// rows C apart by `stride`. As the JAX path: border clamps the coordinates into the volume; zeros
// drops the corners outside; each channel is the sum over the corners, in CORNERS order, of
// ((wx * wy) * wz) * corner. Non-finite coordinates give NaN.
template <int C, bool kBorder>
void SampleRow(const float* __restrict__ ux, const float* __restrict__ uy, const float* __restrict__ uz, float x,
               float y, int64_t Z, const float* __restrict__ vol, int64_t VX, int64_t VY, int64_t VZ,
               float* __restrict__ out, int64_t stride) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float top_x = static_cast<float>(VX - 1), top_y = static_cast<float>(VY - 1), top_z = static_cast<float>(VZ - 1);
  const int32_t vy = static_cast<int32_t>(VY), vz = static_cast<int32_t>(VZ);  // volumes under 2^31 voxels
  const int32_t vn = static_cast<int32_t>(VX) * vy * vz;
  for (int32_t z = 0; z < static_cast<int32_t>(Z); ++z) {
    const float px = x + ux[z], py = y + uy[z], pz = static_cast<float>(z) + uz[z];
    const bool finite = Finite(px, py, pz);
    const Cell c = LocateCell<kBorder>(px, py, pz, finite, top_x, top_y, top_z, vy, vz);
    const float gx = 1.f - c.fx, gy = 1.f - c.fy, gz = 1.f - c.fz;
    const float w[8] = {((gx * gy) * gz) * c.inside[0], ((gx * gy) * c.fz) * c.inside[1],
                        ((gx * c.fy) * gz) * c.inside[2], ((gx * c.fy) * c.fz) * c.inside[3],
                        ((c.fx * gy) * gz) * c.inside[4], ((c.fx * gy) * c.fz) * c.inside[5],
                        ((c.fx * c.fy) * gz) * c.inside[6], ((c.fx * c.fy) * c.fz) * c.inside[7]};
#pragma GCC unroll 3
    for (int ch = 0; ch < C; ++ch) {
      const float* v = vol + ch * vn;
      float total = 0.f;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) total += w[k] * v[c.at[k]];
      out[ch * stride + z] = finite ? total : nan;
    }
  }
}

template <int C, bool kBorder>
void SampleAll(ffi::ThreadPool& pool, const float* u, int64_t X, int64_t Y, int64_t Z, const float* vol, int64_t VX,
               int64_t VY, int64_t VZ, float* out) {
  const int64_t N = X * Y * Z;
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    for (int64_t xy = begin; xy < end; ++xy) {
      const float* row = u + xy * Z;
      SampleRow<C, kBorder>(row, row + N, row + 2 * N, static_cast<float>(xy / Y), static_cast<float>(xy % Y), Z, vol,
                            VX, VY, VZ, out + xy * Z, N);
    }
  });
}

// out (C, X, Y, Z): volume (C, VX, VY, VZ), C = 1 or 3, sampled at x + disp(x), disp (3, X, Y, Z).
ffi::Error SampleImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, ffi::Buffer<ffi::F32> volume,
                      ffi::ResultBuffer<ffi::F32> out, int32_t border) {
  const auto d = disp.dimensions();
  const auto v = volume.dimensions();
  if (d.size() != 4 || d[0] != 3 || v.size() != 4 || (v[0] != 1 && v[0] != 3)) {
    return ffi::Error::InvalidArgument("jaxreg_sample: disp must be (3,X,Y,Z), volume (1 or 3,X,Y,Z)");
  }
  const float* u = disp.typed_data();
  const float* vol = volume.typed_data();
  float* o = out->typed_data();
  const int64_t X = d[1], Y = d[2], Z = d[3];
  if (v[0] == 1 && border) SampleAll<1, true>(pool, u, X, Y, Z, vol, v[1], v[2], v[3], o);
  if (v[0] == 1 && !border) SampleAll<1, false>(pool, u, X, Y, Z, vol, v[1], v[2], v[3], o);
  if (v[0] == 3 && border) SampleAll<3, true>(pool, u, X, Y, Z, vol, v[1], v[2], v[3], o);
  if (v[0] == 3 && !border) SampleAll<3, false>(pool, u, X, Y, Z, vol, v[1], v[2], v[3], o);
  return ffi::Error::Success();
}

// det(J) expanded along the first column in the official evaluator's order (as jacobians.det3).
inline float Det(const float r[3][3]) {
  return r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[1][0] * (r[0][1] * r[2][2] - r[0][2] * r[2][1]) +
         r[2][0] * (r[0][1] * r[1][2] - r[0][2] * r[1][1]);
}

// relu(margin - det J) along one row inside the common interior (the row's last voxel gets 0).
// `u` points at the row's first voxel of component 0; components are N apart.
void ShortfallRow(const float* __restrict__ u, int64_t N, int64_t step_x, int64_t step_y, int64_t Z, float margin,
                  float* __restrict__ out) {
  const float* __restrict__ u0 = u;
  const float* __restrict__ u1 = u + N;
  const float* __restrict__ u2 = u + 2 * N;
  for (int64_t z = 0; z < Z - 1; ++z) {
    const float r[3][3] = {
        {u0[z + step_x] - u0[z] + 1.f, u1[z + step_x] - u1[z], u2[z + step_x] - u2[z]},
        {u0[z + step_y] - u0[z], u1[z + step_y] - u1[z] + 1.f, u2[z + step_y] - u2[z]},
        {u0[z + 1] - u0[z], u1[z + 1] - u1[z], u2[z + 1] - u2[z] + 1.f}};
    out[z] = std::max(margin - Det(r), 0.f);
  }
  out[Z - 1] = 0.f;
}

bool RowHasPositive(const float* row, int64_t n) {
  float largest = 0.f;
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, row[i]);
  return largest > 0.f;
}

// One row (fixed x, y, inside) of the fold mask: any of the ten digital Jacobians of
// phi = x + disp negative (jaxreg.ops.jacobians.digital_jacobians, with phi formed and differenced in
// float32 as unfold.fold_mask does). u0, u1, u2: the row's components; sx, sy: strides along x, y.
// Only voxels z in [z_begin, z_end) are written (the border ones as false).
void FoldMaskRow(const float* __restrict__ u0, const float* __restrict__ u1, const float* __restrict__ u2,
                 int64_t sx, int64_t sy, float x, float y, int64_t Z, int64_t z_begin, int64_t z_end,
                 bool* __restrict__ out) {
  if (z_begin <= 0) out[0] = false;
  if (z_end >= Z) out[Z - 1] = false;
  // offsets of the 12 neighbours: +-x, +-y, +-z, then J*1's (-1,-1,0), (-1,0,-1), (0,-1,-1) and
  // J*2's (1,1,0), (0,1,1), (1,0,1)
  const int steps[12][3] = {{1, 0, 0}, {-1, 0, 0}, {0, 1, 0}, {0, -1, 0}, {0, 0, 1}, {0, 0, -1},
                            {-1, -1, 0}, {-1, 0, -1}, {0, -1, -1}, {1, 1, 0}, {0, 1, 1}, {1, 0, 1}};
  int64_t offset[12];
  for (int n = 0; n < 12; ++n) offset[n] = steps[n][0] * sx + steps[n][1] * sy + steps[n][2];
  for (int64_t z = std::max<int64_t>(1, z_begin); z < std::min(Z - 1, z_end); ++z) {
    const float zf = static_cast<float>(z);
    const float c0 = u0[z] + x, c1 = u1[z] + y, c2 = u2[z] + zf;  // phi at the voxel
    float d[12][3];  // phi(neighbour) - phi(voxel)
#pragma GCC unroll 12
    for (int n = 0; n < 12; ++n) {
      d[n][0] = (u0[z + offset[n]] + (x + steps[n][0])) - c0;
      d[n][1] = (u1[z + offset[n]] + (y + steps[n][1])) - c1;
      d[n][2] = (u2[z + offset[n]] + (zf + steps[n][2])) - c2;
    }
    // backward differences are centre - phi(neighbour - e_a) = -(phi(neighbour) - centre)
    bool folded = false;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {  // forward or backward on each axis
      float r[3][3];
#pragma GCC unroll 3
      for (int a = 0; a < 3; ++a) {
        const bool back = (k >> (2 - a)) & 1;
        const float* row = d[2 * a + back];
        r[a][0] = back ? -row[0] : row[0], r[a][1] = back ? -row[1] : row[1], r[a][2] = back ? -row[2] : row[2];
      }
      folded |= Det(r) < 0.f;
    }
    const float j1[3][3] = {{d[6][0], d[6][1], d[6][2]}, {d[7][0], d[7][1], d[7][2]}, {d[8][0], d[8][1], d[8][2]}};
    const float j2[3][3] = {{d[9][0], d[9][1], d[9][2]}, {d[10][0], d[10][1], d[10][2]}, {d[11][0], d[11][1], d[11][2]}};
    out[z] = folded | (Det(j1) < 0.f) | (Det(j2) < 0.f);
  }
}

// Row xy of the fold mask (X,Y,Z), voxels z in [z_begin, z_end): one of the ten digital Jacobians
// of x + disp(x) negative; the one-voxel border is false. A voxel's Jacobians read phi within one
// voxel of it.
void FoldMaskRow(const float* u, int64_t X, int64_t Y, int64_t Z, int64_t xy, int64_t z_begin, int64_t z_end,
                 bool* mask) {
  const int64_t x = xy / Y, y = xy % Y;
  if (x == 0 || x == X - 1 || y == 0 || y == Y - 1 || Z < 3) {
    std::fill(mask + xy * Z + z_begin, mask + xy * Z + z_end, false);
    return;
  }
  const int64_t N = X * Y * Z;
  const float* row = u + xy * Z;
  FoldMaskRow(row, row + N, row + 2 * N, Y * Z, Z, static_cast<float>(x), static_cast<float>(y), Z, z_begin, z_end,
              mask + xy * Z);
}

ffi::Error FoldMaskImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, ffi::ResultBuffer<ffi::PRED> mask) {
  const auto d = disp.dimensions();
  if (d.size() != 4 || d[0] != 3) return ffi::Error::InvalidArgument("jaxreg_fold_mask: disp must be (3,X,Y,Z)");
  const float* u = disp.typed_data();
  const int64_t X = d[1], Y = d[2], Z = d[3];
  bool* out = mask->typed_data();
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    for (int64_t xy = begin; xy < end; ++xy) FoldMaskRow(u, X, Y, Z, xy, 0, Z, out);
  });
  return ffi::Error::Success();
}

// The 3^3 box average of component u (X,Y,Z) at (x, y, z), border replicated, summed as
// filters._box_filter_jax does: along x, then y, then z, each sum ((a + b) + c) / 3.
inline float BoxAverage3(const float* u, int64_t X, int64_t Y, int64_t Z, int64_t x, int64_t y, int64_t z) {
  auto clamp = [](int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); };
  float along_z[3];
  for (int dz = -1; dz <= 1; ++dz) {
    const int64_t k = clamp(z + dz, Z);
    float along_y[3];
    for (int dy = -1; dy <= 1; ++dy) {
      const int64_t j = clamp(y + dy, Y);
      const float a = u[(clamp(x - 1, X) * Y + j) * Z + k], b = u[(x * Y + j) * Z + k],
                  c = u[(clamp(x + 1, X) * Y + j) * Z + k];
      along_y[dy + 1] = ((a + b) + c) / 3.f;
    }
    along_z[dz + 1] = ((along_y[0] + along_y[1]) + along_y[2]) / 3.f;
  }
  return ((along_z[0] + along_z[1]) + along_z[2]) / 3.f;
}

// f(ij) for every row ij (of X x Y rows along z) within `reach` rows of row xy along x and y.
template <typename F>
inline void ForRowsAround(int64_t xy, int64_t reach, int64_t X, int64_t Y, F f) {
  const int64_t x = xy / Y, y = xy % Y;
  for (int64_t i = std::max<int64_t>(0, x - reach); i <= std::min(X - 1, x + reach); ++i) {
    for (int64_t j = std::max<int64_t>(0, y - reach); j <= std::min(Y - 1, y + reach); ++j) f(i * Y + j);
  }
}

// unfold.unfold: copy disp; then, while voxels fold and rounds remain, move the field on the folding
// voxels (the first `local_rounds` rounds) or on the fold mask grown by a grow^3 box (later rounds)
// `blend` of the way to its 3^3 box average of the previous round's field, and recompute the mask
// within one voxel of the voxels that moved. After the copy and the first mask, each round reads and
// writes only the stretch of each row (x, y) that lies near folding voxels.
ffi::Error UnfoldImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> disp, ffi::ResultBuffer<ffi::F32> field_out,
                      ffi::ResultBuffer<ffi::S32> rounds_out, ffi::ResultBuffer<ffi::S32> folding_out,
                      int32_t rounds, int32_t local_rounds, int32_t grow, float blend) {
  const auto d = disp.dimensions();
  if (d.size() != 4 || d[0] != 3) return ffi::Error::InvalidArgument("jaxreg_unfold: disp must be (3,X,Y,Z)");
  if (grow < 1 || grow % 2 != 1) return ffi::Error::InvalidArgument("jaxreg_unfold: grow must be odd and positive");
  const int64_t X = d[1], Y = d[2], Z = d[3], N = X * Y * Z, rows = X * Y;
  const float* in = disp.typed_data();
  float* u = field_out->typed_data();
  ParallelFor(pool, 3 * rows, 64, [=](int64_t begin, int64_t end) { std::copy(in + begin * Z, in + end * Z, u + begin * Z); });

  std::unique_ptr<bool[]> mask(new bool[N]);
  std::vector<int64_t> folds(rows, 0), fold_lo(rows, 0), fold_hi(rows, -1);  // per row: count, [lo, hi]
  // per row: the stretch [lo, hi] whose mask is recomputed (hi < lo: none)
  std::vector<int64_t> redo_lo(rows, 0), redo_hi(rows, Z - 1);
  auto remask = [&](const std::vector<int64_t>& list) {
    bool* m = mask.get();
    ParallelFor(pool, static_cast<int64_t>(list.size()), 16, [&, m](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t xy = list[r];
        FoldMaskRow(u, X, Y, Z, xy, redo_lo[xy], redo_hi[xy] + 1, m);
        const bool* row = m + xy * Z;
        int64_t count = 0, lo = Z, hi = -1;
        for (int64_t z = 0; z < Z; ++z) {
          if (!row[z]) continue;
          ++count, lo = std::min(lo, z), hi = z;
        }
        folds[xy] = count, fold_lo[xy] = lo, fold_hi[xy] = hi;
      }
    });
  };
  std::vector<int64_t> list(rows);
  for (int64_t xy = 0; xy < rows; ++xy) list[xy] = xy;
  remask(list);
  auto total = [&] {
    int64_t n = 0;
    for (int64_t c : folds) n += c;
    return n;
  };

  std::unique_ptr<bool[]> near(new bool[N]);  // read only where written this round
  std::unique_ptr<float[]> next(new float[3 * N]);
  std::vector<int64_t> near_lo(rows), near_hi(rows);
  int32_t done = 0;
  auto run = [&](int g, int32_t last) {
    const int64_t h = g / 2;
    while (done < last && total() > 0) {
      // rows with a voxel to move: within h rows (x, y) of a folding voxel; their stretch along z
      std::vector<int64_t> moved;
      for (int64_t xy = 0; xy < rows; ++xy) {
        int64_t lo = Z, hi = -1;
        ForRowsAround(xy, h, X, Y, [&](int64_t ij) {
          if (folds[ij] > 0) lo = std::min(lo, fold_lo[ij] - h), hi = std::max(hi, fold_hi[ij] + h);
        });
        if (hi < 0) continue;
        near_lo[xy] = std::max<int64_t>(0, lo), near_hi[xy] = std::min(Z - 1, hi);
        moved.push_back(xy);
      }
      // near: the folding voxels grown by h along every axis (box_filter(folded, g) > 0); next: the
      // moved values, from the previous round's field
      bool* nm = near.get();
      const bool* m = mask.get();
      float* nx = next.get();
      ParallelFor(pool, static_cast<int64_t>(moved.size()), 16, [&, nm, m, nx](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t xy = moved[r], x = xy / Y, y = xy % Y, lo = near_lo[xy], hi = near_hi[xy];
          bool* out = nm + xy * Z;
          std::fill(out + lo, out + hi + 1, false);
          ForRowsAround(xy, h, X, Y, [&](int64_t ij) {
            for (int64_t z = fold_lo[ij]; z <= fold_hi[ij]; ++z) {  // empty for a row without folds
              if (!m[ij * Z + z]) continue;
              for (int64_t k = std::max<int64_t>(lo, z - h); k <= std::min(hi, z + h); ++k) out[k] = true;
            }
          });
          for (int c = 0; c < 3; ++c) {
            const float* uc = u + c * N;
            for (int64_t z = lo; z <= hi; ++z) {
              if (!out[z]) continue;
              const float f = uc[xy * Z + z];
              nx[c * N + xy * Z + z] = f + blend * (BoxAverage3(uc, X, Y, Z, x, y, z) - f);
            }
          }
        }
      });
      ParallelFor(pool, static_cast<int64_t>(moved.size()), 64, [&, nm, nx](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t xy = moved[r];
          for (int64_t z = near_lo[xy]; z <= near_hi[xy]; ++z) {
            if (!nm[xy * Z + z]) continue;
            for (int c = 0; c < 3; ++c) u[c * N + xy * Z + z] = nx[c * N + xy * Z + z];
          }
        }
      });
      // the mask changes only within one voxel of a moved voxel
      std::vector<char> stale(rows, 0);
      for (int64_t xy : moved) {
        const int64_t lo = std::max<int64_t>(0, near_lo[xy] - 1), hi = std::min(Z - 1, near_hi[xy] + 1);
        ForRowsAround(xy, 1, X, Y, [&](int64_t ij) {
          if (!stale[ij]) stale[ij] = 1, redo_lo[ij] = lo, redo_hi[ij] = hi;
          else redo_lo[ij] = std::min(redo_lo[ij], lo), redo_hi[ij] = std::max(redo_hi[ij], hi);
        });
      }
      list.clear();
      for (int64_t xy = 0; xy < rows; ++xy) if (stale[xy]) list.push_back(xy);
      remask(list);
      ++done;
    }
  };
  if (local_rounds > 0) run(1, std::min(local_rounds, rounds));
  run(grow, rounds);
  *rounds_out->typed_data() = done;
  *folding_out->typed_data() = static_cast<int32_t>(total());
  return ffi::Error::Success();
}

// F_a = scale * shortfall * (cofactor row a of J) along row xy (3 x Z, component-major), or zeros
// when `any` is false. Only rows inside the interior have a shortfall, so the forward differences
// stay in the volume; the row's last voxel reads the next row's first, with shortfall 0 there.
template <int A>
void FluxRowOrZeros(const float* u, const float* shortfall, int64_t N, int64_t Y, int64_t Z, int64_t xy, bool any,
                    float scale, float* __restrict__ out) {
  if (!any) {
    std::fill(out, out + 3 * Z, 0.f);
    return;
  }
  constexpr int B = (A + 1) % 3, E = (A + 2) % 3;  // cofactor row a = row b x row e
  const float* __restrict__ u0 = u + xy * Z;
  const float* __restrict__ u1 = u0 + N;
  const float* __restrict__ u2 = u1 + N;
  const float* __restrict__ s = shortfall + xy * Z;
  const int64_t sx = Y * Z, sy = Z;
  for (int64_t z = 0; z < Z; ++z) {
    const float r[3][3] = {
        {u0[z + sx] - u0[z] + 1.f, u1[z + sx] - u1[z], u2[z + sx] - u2[z]},
        {u0[z + sy] - u0[z], u1[z + sy] - u1[z] + 1.f, u2[z + sy] - u2[z]},
        {u0[z + 1] - u0[z], u1[z + 1] - u1[z], u2[z + 1] - u2[z] + 1.f}};
    const float weight = scale * s[z];
    out[z] = weight * (r[B][1] * r[E][2] - r[B][2] * r[E][1]);
    out[Z + z] = weight * (r[B][2] * r[E][0] - r[B][0] * r[E][2]);
    out[2 * Z + z] = weight * (r[B][0] * r[E][1] - r[B][1] * r[E][0]);
  }
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
      if (x < X - 1 && y < Y - 1) {
        ShortfallRow(u + xy * Z, N, step[0], step[1], Z, margin, s + xy * Z);
      } else {
        std::fill(s + xy * Z, s + (xy + 1) * Z, 0.f);
      }
    }
  });
  ParallelFor(pool, X * Y, 8, [=](int64_t begin, int64_t end) {
    std::vector<float> buffer(5 * 3 * Z);
    float* fx_here = buffer.data();   // F_x on this row, on the row before along x,
    float* fx_before = fx_here + 3 * Z;
    float* fy_here = fx_before + 3 * Z;  // F_y on this row, on the row before along y,
    float* fy_before = fy_here + 3 * Z;
    float* fz_here = fy_before + 3 * Z;  // F_z on this row (the voxel before along z is on it too)
    for (int64_t xy = begin; xy < end; ++xy) {
      const int64_t x = xy / Y, y = xy % Y;
      // most rows see no shortfall here, on the row before along y or on the one before along x
      const bool here = RowHasPositive(s + xy * Z, Z);
      const bool before_x = x > 0 && RowHasPositive(s + (xy - Y) * Z, Z);
      const bool before_y = y > 0 && RowHasPositive(s + (xy - 1) * Z, Z);
      if (!here && !before_x && !before_y) {
        for (int c = 0; c < 3; ++c) std::fill(g + c * N + xy * Z, g + c * N + (xy + 1) * Z, 0.f);
        continue;
      }
      FluxRowOrZeros<0>(u, s, N, Y, Z, xy, here, scale, fx_here);
      FluxRowOrZeros<0>(u, s, N, Y, Z, xy - Y, before_x, scale, fx_before);
      FluxRowOrZeros<1>(u, s, N, Y, Z, xy, here, scale, fy_here);
      FluxRowOrZeros<1>(u, s, N, Y, Z, xy - 1, before_y, scale, fy_before);
      FluxRowOrZeros<2>(u, s, N, Y, Z, xy, here, scale, fz_here);
      for (int c = 0; c < 3; ++c) {
        const float* __restrict__ a0 = fx_here + c * Z;
        const float* __restrict__ b0 = fx_before + c * Z;
        const float* __restrict__ a1 = fy_here + c * Z;
        const float* __restrict__ b1 = fy_before + c * Z;
        const float* __restrict__ a2 = fz_here + c * Z;
        float* __restrict__ out = g + c * N + xy * Z;
        // summed in the JAX path's order: per axis, minus the flux here, plus the one before
        out[0] = ((((0.f - a0[0]) + b0[0]) - a1[0]) + b1[0]) - a2[0];
        for (int64_t z = 1; z < Z; ++z) out[z] = (((((0.f - a0[z]) + b0[z]) - a1[z]) + b1[z]) - a2[z]) + a2[z - 1];
      }
    }
  });
  return ffi::Error::Success();
}

constexpr int kMaxRadius = 16;

// out[i] = scale * (terms[0][i] + ... + terms[K-1][i]): one pass, K fixed so that it vectorises.
template <int K>
void SumOf(const float* const* terms, int64_t n, float scale, float* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    float total = terms[0][i];
#pragma GCC unroll 8
    for (int k = 1; k < K; ++k) total += terms[k][i];
    out[i] = total * scale;
  }
}

// The same for any number of terms (zero terms: zeros).
void Sum(const float* const* terms, int count, int64_t n, float scale, float* out) {
  switch (count) {
    case 1: return SumOf<1>(terms, n, scale, out);
    case 2: return SumOf<2>(terms, n, scale, out);
    case 3: return SumOf<3>(terms, n, scale, out);
    case 4: return SumOf<4>(terms, n, scale, out);
    case 5: return SumOf<5>(terms, n, scale, out);
    default: break;
  }
  if (count == 0) {
    std::fill(out, out + n, 0.f);
    return;
  }
  SumOf<1>(terms, n, 1.f, out);
  for (int k = 1; k < count; ++k) {
    const float* q = terms[k];
    for (int64_t i = 0; i < n; ++i) out[i] += q[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] *= scale;
}

// The window sums of one row of n values, half-width r: interior voxels in one vectorised pass,
// the r voxels at each end with the padding (edge: the end value; zeros: nothing).
void RowWindow(const float* row, int64_t n, int r, bool edge, float scale, float* out) {
  if (r == 0) {
    std::copy(row, row + n, out);
    return;
  }
  const float* terms[2 * kMaxRadius + 1];
  if (n > 2 * r) {
    for (int k = 0; k <= 2 * r; ++k) terms[k] = row + k;
    Sum(terms, 2 * r + 1, n - 2 * r, scale, out + r);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i == r && n > 2 * r) i = n - r;  // the interior is done
    float total = 0.f;
    for (int64_t j = i - r; j <= i + r; ++j) {
      if (j >= 0 && j < n) total += row[j];
      else if (edge) total += row[j < 0 ? 0 : n - 1];
    }
    out[i] = total * scale;
  }
}

// exp(x) for x <= 0 (below -87 it returns 2^-126 * ~1, not 0): Cephes' single-precision polynomial,
// within 2 ulp of expf, written so that the calling loop vectorises (no libm call).
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

constexpr int kMindChannels = 12;

// The patch SSDs of the twelve MIND-SSC pairs on the tile of planes [x0, x1) and rows [y0, y1),
// box-summed over the (2r+1)^3 window (the SSD volume edge-replicated, as before ConvexAdam's box
// filter) and scaled by `scale`: boxed (12, x1 - x0, y1 - y0, Z). `padded`: the image replicated
// by `pad` voxels at every edge; pairs (12, 6): the two offsets of each channel. The tile's
// intermediates (SSD rows, sums along z and y) stay in cache.
void MindTile(const float* padded, int64_t X, int64_t Y, int64_t Z, int64_t pad, const int32_t* pairs, int r,
              int64_t x0, int64_t x1, int64_t y0, int64_t y1, float scale, std::vector<float>& work, float* boxed) {
  const int64_t PY = Y + 2 * pad, PZ = Z + 2 * pad, planes = x1 - x0 + 2 * r, rows = y1 - y0, halo = rows + 2 * r;
  work.resize(Z + halo * Z + planes * kMindChannels * rows * Z);
  float* row_ssd = work.data();
  float* z_sums = row_ssd + Z;                // (halo, Z): one plane and channel
  float* yz_sums = z_sums + halo * Z;         // (planes, 12, rows, Z)
  const float* terms[2 * kMaxRadius + 1];
  for (int64_t q = 0; q < planes; ++q) {
    const int64_t p = std::min(std::max<int64_t>(x0 - r + q, 0), X - 1);
    for (int k = 0; k < kMindChannels; ++k) {
      const int32_t* o = pairs + 6 * k;
      for (int64_t h = 0; h < halo; ++h) {
        const int64_t y = std::min(std::max<int64_t>(y0 - r + h, 0), Y - 1);
        const float* a = padded + ((p + pad + o[0]) * PY + y + pad + o[1]) * PZ + pad + o[2];
        const float* b = padded + ((p + pad + o[3]) * PY + y + pad + o[4]) * PZ + pad + o[5];
        for (int64_t z = 0; z < Z; ++z) {
          const float d = a[z] - b[z];
          row_ssd[z] = d * d;
        }
        RowWindow(row_ssd, Z, r, true, 1.f, z_sums + h * Z);
      }
      float* out = yz_sums + (q * kMindChannels + k) * rows * Z;
      for (int64_t y = 0; y < rows; ++y) {
        for (int j = 0; j <= 2 * r; ++j) terms[j] = z_sums + (y + j) * Z;
        Sum(terms, 2 * r + 1, Z, 1.f, out + y * Z);
      }
    }
  }
  const int64_t block = rows * Z;
  for (int64_t x = 0; x < x1 - x0; ++x) {
    for (int k = 0; k < kMindChannels; ++k) {
      for (int j = 0; j <= 2 * r; ++j) terms[j] = yz_sums + ((x + j) * kMindChannels + k) * block;
      Sum(terms, 2 * r + 1, block, scale, boxed + (k * (x1 - x0) + x) * block);
    }
  }
}

// Per voxel v of boxed (12, n): low[v], the least of the twelve SSDs, and variance[v], the mean of
// SSD - low. Loops over v innermost, so that they vectorise.
void MinAndVariance(const float* boxed, int64_t n, float* __restrict__ low, float* __restrict__ variance) {
  std::copy(boxed, boxed + n, low);
  for (int k = 1; k < kMindChannels; ++k) {
    const float* b = boxed + k * n;
    for (int64_t v = 0; v < n; ++v) low[v] = std::min(low[v], b[v]);
  }
  std::fill(variance, variance + n, 0.f);
  for (int k = 0; k < kMindChannels; ++k) {
    const float* b = boxed + k * n;
    for (int64_t v = 0; v < n; ++v) variance[v] += b[v] - low[v];
  }
  for (int64_t v = 0; v < n; ++v) variance[v] /= kMindChannels;
}

// mind (12, X/f, Y/f, Z/f): features.mind_ssc_pooled. Sweep 1 sums the per-voxel variance (mean over
// the channels of SSD - min SSD) over the image for the clamp; sweep 2 forms exp(-(SSD - min) /
// variance) and averages f^3 blocks. Tasks are tiles of a few planes and rows (multiples of f).
ffi::Error MindImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::S32> pairs,
                    ffi::ResultBuffer<ffi::F32> mind, int32_t radius, int32_t factor) {
  const auto d = image.dimensions();
  if (d.size() != 3 || pairs.element_count() != 6 * kMindChannels || radius < 0 || radius > kMaxRadius ||
      factor < 1) {
    return ffi::Error::InvalidArgument("jaxreg_mind: image (X,Y,Z), pairs (12,6), 0 <= radius <= 16, factor >= 1");
  }
  const int64_t X = d[0], Y = d[1], Z = d[2], f = factor, r = radius;
  const int32_t* o = pairs.typed_data();
  int64_t pad = 0;
  for (int i = 0; i < 6 * kMindChannels; ++i) pad = std::max<int64_t>(pad, std::abs(o[i]));
  const int64_t PX = X + 2 * pad, PY = Y + 2 * pad, PZ = Z + 2 * pad;
  std::vector<float> padded(PX * PY * PZ);
  const float* img = image.typed_data();
  float* pd = padded.data();
  ParallelFor(pool, PX * PY, 64, [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t x = std::min(std::max<int64_t>(row / PY - pad, 0), X - 1);
      const int64_t y = std::min(std::max<int64_t>(row % PY - pad, 0), Y - 1);
      const float* src = img + (x * Y + y) * Z;
      float* dst = pd + row * PZ;
      for (int64_t z = 0; z < PZ; ++z) dst[z] = src[std::min(std::max<int64_t>(z - pad, 0), Z - 1)];
    }
  });
  const int64_t span_x = std::max<int64_t>(f, (4 / f) * f), span_y = std::max<int64_t>(f, (16 / f) * f);
  const int64_t tiles_y = (Y + span_y - 1) / span_y, tiles = (X + span_x - 1) / span_x * tiles_y;
  const int64_t window = 2 * r + 1;
  const float scale = 1.f / static_cast<float>(window * window * window);
  // tile t: its box-filtered SSDs, then body(x0, x1, y0, y1, boxed (12, x1 - x0, y1 - y0, Z))
  auto sweep = [&](int64_t t, std::vector<float>& work, std::vector<float>& boxed, auto&& body) {
    const int64_t x0 = t / tiles_y * span_x, x1 = std::min(X, x0 + span_x);
    const int64_t y0 = t % tiles_y * span_y, y1 = std::min(Y, y0 + span_y);
    boxed.resize(kMindChannels * (x1 - x0) * (y1 - y0) * Z);
    MindTile(pd, X, Y, Z, pad, o, static_cast<int>(r), x0, x1, y0, y1, scale, work, boxed.data());
    body(x0, x1, y0, y1, boxed.data());
  };
  // sweep 1: the variance summed per tile (in double, added in tile order: the same sum every run)
  std::vector<double> partial(tiles, 0.0);
  ParallelFor(pool, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work, boxed, low, variance;
    for (int64_t t = begin; t < end; ++t) {
      sweep(t, work, boxed, [&](int64_t x0, int64_t x1, int64_t y0, int64_t y1, const float* b) {
        const int64_t n = (x1 - x0) * (y1 - y0) * Z;
        low.resize(n), variance.resize(n);
        MinAndVariance(b, n, low.data(), variance.data());
        double total = 0.0;
        for (int64_t v = 0; v < n; ++v) total += variance[v];
        partial[t] = total;
      });
    }
  });
  double total = 0.0;
  for (double t : partial) total += t;
  const float mean_variance = static_cast<float>(total / static_cast<double>(X * Y * Z));
  const float low_bound = std::max(mean_variance * 1e-3f, 1e-12f), high_bound = std::max(mean_variance * 1e3f, 1e-12f);
  // sweep 2: the descriptor, averaged over f^3 blocks (trailing voxels that fill no block dropped)
  const int64_t OX = X / f, OY = Y / f, OZ = Z / f;
  float* out = mind->typed_data();
  const float block = 1.f / static_cast<float>(f * f * f);
  ParallelFor(pool, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work, boxed, low, bound, value, column;
    for (int64_t t = begin; t < end; ++t) {
      sweep(t, work, boxed, [&](int64_t x0, int64_t x1, int64_t y0, int64_t y1, const float* b) {
        const int64_t rows = y1 - y0, n = (x1 - x0) * rows * Z;
        low.resize(n), bound.resize(n), value.resize(n), column.resize(Z);
        MinAndVariance(b, n, low.data(), bound.data());
        for (int64_t v = 0; v < n; ++v) bound[v] = std::min(std::max(bound[v], low_bound), high_bound);
        for (int k = 0; k < kMindChannels; ++k) {
          const float* bk = b + k * n;
          for (int64_t v = 0; v < n; ++v) value[v] = ExpNonPositive(-((bk[v] - low[v]) / bound[v]));
          // each f^3 block: its f^2 rows added, then f neighbours along z (whole blocks only)
          for (int64_t xo = x0 / f; xo < std::min(OX, x1 / f); ++xo) {
            for (int64_t yo = y0 / f; yo < std::min(OY, y1 / f); ++yo) {
              std::fill(column.begin(), column.end(), 0.f);
              for (int64_t x = xo * f; x < (xo + 1) * f; ++x) {
                for (int64_t y = yo * f; y < (yo + 1) * f; ++y) {
                  const float* v_row = value.data() + ((x - x0) * rows + (y - y0)) * Z;
                  for (int64_t z = 0; z < Z; ++z) column[z] += v_row[z];
                }
              }
              float* o_row = out + ((k * OX + xo) * OY + yo) * OZ;
              for (int64_t zo = 0; zo < OZ; ++zo) {
                float sum = 0.f;
                for (int64_t j = 0; j < f; ++j) sum += column[zo * f + j];
                o_row[zo] = sum * block;
              }
            }
          }
        }
      });
    }
  });
  return ffi::Error::Success();
}

// The box sums along z (half-width rz, scaled by sz) then y (ry, sy) of rows [r0, r1) of a plane,
// given its rows [s0, s1) in `source` (each row Z long); zeros pad the plane, or with `edge` its
// first and last rows and values repeat (then [s0, s1) must hold rows 0 and Y - 1 where reached).
// `zsums` is scratch of (s1 - s0) rows; target gets r1 - r0 rows.
void FilterRows(const float* source, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t Y, int64_t Z, int rz,
                float sz, int ry, float sy, bool edge, float* zsums, float* target) {
  for (int64_t y = s0; y < s1; ++y) RowWindow(source + (y - s0) * Z, Z, rz, edge, sz, zsums + (y - s0) * Z);
  const float* terms[2 * kMaxRadius + 1];
  for (int64_t y = r0; y < r1; ++y) {
    int count = 0;
    for (int64_t j = y - ry; j <= y + ry; ++j) {
      if (j >= 0 && j < Y) terms[count++] = zsums + (j - s0) * Z;
      else if (edge) terms[count++] = zsums + ((j < 0 ? 0 : Y - 1) - s0) * Z;
    }
    Sum(terms, count, Z, sy, target + (y - r0) * Z);
  }
}

// cost (n,X,Y,Z): for every candidate offset o_i (offsets (n,3), int32), the sum over channels of
// (fixed_c(x) - moving_c(x + o_i))^2, moving zero outside; fixed, moving (C,X,Y,Z). One task per
// (x, y) row: the row's fixed channels and the moving rows it reads stay in cache for all n offsets.
ffi::Error CostVolumeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> fixed, ffi::Buffer<ffi::F32> moving,
                          ffi::Buffer<ffi::S32> offsets, ffi::ResultBuffer<ffi::F32> cost) {
  const auto d = fixed.dimensions();
  if (d.size() != 4 || moving.dimensions().size() != 4 || offsets.dimensions().size() != 2 ||
      offsets.dimensions()[1] != 3) {
    return ffi::Error::InvalidArgument("jaxreg_cost_volume: fixed, moving (C,X,Y,Z), offsets (n,3)");
  }
  const int64_t C = d[0], X = d[1], Y = d[2], Z = d[3], M = X * Y * Z, n = offsets.dimensions()[0];
  const float* f = fixed.typed_data();
  const float* m = moving.typed_data();
  const int32_t* o = offsets.typed_data();
  float* out = cost->typed_data();
  ParallelFor(pool, X * Y, 4, [=](int64_t begin, int64_t end) {
    std::vector<float> squares(Z);
    for (int64_t xy = begin; xy < end; ++xy) {
      const int64_t x = xy / Y, y = xy % Y;
      // sum over channels of fixed^2: the cost wherever the moving side is outside
      std::fill(squares.begin(), squares.end(), 0.f);
      for (int64_t c = 0; c < C; ++c) {
        const float* fr = f + c * M + xy * Z;
        for (int64_t z = 0; z < Z; ++z) squares[z] += fr[z] * fr[z];
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ox = o[3 * i], oy = o[3 * i + 1], oz = o[3 * i + 2];
        float* __restrict__ row = out + i * M + xy * Z;
        const int64_t mx = x + ox, my = y + oy;
        if (mx < 0 || mx >= X || my < 0 || my >= Y) {
          std::copy(squares.begin(), squares.end(), row);
          continue;
        }
        const int64_t lo = std::max<int64_t>(0, -oz), hi = std::min<int64_t>(Z, Z - oz);
        for (int64_t z = 0; z < Z; ++z) row[z] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float* __restrict__ fr = f + c * M + xy * Z;
          const float* __restrict__ mr = m + c * M + (mx * Y + my) * Z + oz;
          for (int64_t z = lo; z < hi; ++z) {
            const float e = fr[z] - mr[z];
            row[z] += e * e;
          }
        }
        for (int64_t z = 0; z < lo; ++z) row[z] = squares[z];
        for (int64_t z = hi; z < Z; ++z) row[z] = squares[z];
      }
    }
  });
  return ffi::Error::Success();
}

// Per cell, the first candidate index minimising cost[i] + weight * |offsets[i] - centre|^2, cells in
// blocks so that a block's running minimum stays in cache while the candidates stream past it.
ffi::Error CoupledArgminImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> cost, ffi::Buffer<ffi::F32> offsets,
                             ffi::Buffer<ffi::F32> centre, float weight, ffi::ResultBuffer<ffi::S32> best) {
  const auto d = cost.dimensions();
  if (d.size() != 4 || offsets.dimensions().size() != 2 || offsets.dimensions()[0] != d[0] ||
      offsets.dimensions()[1] != 3 || centre.element_count() != 3 * d[1] * d[2] * d[3]) {
    return ffi::Error::InvalidArgument("jaxreg_coupled_argmin: cost (n,X,Y,Z), offsets (n,3), centre (3,X,Y,Z)");
  }
  const int64_t n = d[0], M = d[1] * d[2] * d[3];
  const float* c = cost.typed_data();
  const float* o = offsets.typed_data();
  const float* m = centre.typed_data();
  int32_t* out = best->typed_data();
  constexpr int64_t kBlock = 8192;
  ParallelFor(pool, (M + kBlock - 1) / kBlock, 1, [=](int64_t begin, int64_t end) {
    float lowest[kBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t start = block * kBlock, count = std::min(kBlock, M - start);
      int32_t* __restrict__ arg = out + start;
      const float* __restrict__ m0 = m + start;
      const float* __restrict__ m1 = m + M + start;
      const float* __restrict__ m2 = m + 2 * M + start;
      for (int64_t j = 0; j < count; ++j) lowest[j] = std::numeric_limits<float>::infinity(), arg[j] = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float* __restrict__ row = c + i * M + start;
        const float o0 = o[3 * i], o1 = o[3 * i + 1], o2 = o[3 * i + 2];
        const int32_t index = static_cast<int32_t>(i);
        for (int64_t j = 0; j < count; ++j) {
          const float e0 = o0 - m0[j], e1 = o1 - m1[j], e2 = o2 - m2[j];
          const float value = row[j] + weight * (((0.f + e0 * e0) + e1 * e1) + e2 * e2);
          const bool better = value < lowest[j];
          lowest[j] = better ? value : lowest[j];
          arg[j] = better ? index : arg[j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Box-averages x (B,X,Y,Z) with half-width size / 2 along the axes whose bit is set in `axes`
// (1: X, 2: Y, 4: Z), `edge` replicating the border, otherwise zeros padding it, and hands each
// output plane to emit(b, x, terms, count, scale): the plane is scale * (terms[0] + ... +
// terms[count - 1]), each term a plane filtered along y and z. Tasks of 16 output planes keep a
// ring of filtered planes: one read of x, and each plane filtered once (plus 2 rx planes of margin).
template <typename Emit>
void BoxSweep(ffi::ThreadPool& pool, const float* in, int64_t B, int64_t X, int64_t Y, int64_t Z, int32_t size,
              int32_t axes, bool edge, Emit emit) {
  const int64_t plane = Y * Z;
  const int rx = (axes & 1) ? size / 2 : 0, ry = (axes & 2) ? size / 2 : 0, rz = (axes & 4) ? size / 2 : 0;
  const float sx = (axes & 1) ? 1.f / size : 1.f, sy = (axes & 2) ? 1.f / size : 1.f, sz = (axes & 4) ? 1.f / size : 1.f;
  const int64_t chunk = 16;  // output planes per task
  const int64_t chunks_per_volume = (X + chunk - 1) / chunk;
  ParallelFor(pool, B * chunks_per_volume, 1, [=](int64_t begin, int64_t end) {
    const int ring_size = 2 * rx + 1;
    std::vector<float> ring(ring_size * plane), rows(plane);
    const float* terms[2 * kMaxRadius + 1];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks_per_volume, x0 = (task % chunks_per_volume) * chunk;
      const int64_t x1 = std::min(X, x0 + chunk);
      const float* volume = in + b * X * plane;
      auto slot = [&](int64_t p) { return ring.data() + ((p + ring_size * X) % ring_size) * plane; };
      // plane p (0 <= p < X) filtered along z, then y, into its ring slot
      auto filter_plane = [&](int64_t p) {
        FilterRows(volume + p * plane, 0, Y, 0, Y, Y, Z, rz, sz, ry, sy, edge, rows.data(), slot(p));
      };
      for (int64_t p = std::max<int64_t>(x0 - rx, 0); p < std::min(x0 + rx, X); ++p) filter_plane(p);
      for (int64_t x = x0; x < x1; ++x) {
        if (x + rx < X) filter_plane(x + rx);
        int count = 0;
        for (int64_t p = x - rx; p <= x + rx; ++p) {
          if (p >= 0 && p < X) terms[count++] = slot(p);
          else if (edge) terms[count++] = slot(p < 0 ? 0 : X - 1);
        }
        emit(b, x, terms, count, sx);
      }
    }
  });
}

// x (B,X,Y,Z) -> the same shape, box-averaged (BoxSweep).
ffi::Error BoxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> input, int32_t size, int32_t axes, int32_t edge,
                   ffi::ResultBuffer<ffi::F32> output) {
  const auto d = input.dimensions();
  if (d.size() != 4 || size < 1 || size % 2 != 1 || size > 2 * kMaxRadius + 1) {
    return ffi::Error::InvalidArgument("jaxreg_box: input must be (B,X,Y,Z) and size odd, at most 33");
  }
  const int64_t X = d[1], Y = d[2], Z = d[3], plane = Y * Z;
  float* out = output->typed_data();
  BoxSweep(pool, input.typed_data(), d[0], X, Y, Z, size, axes, edge != 0,
           [=](int64_t b, int64_t x, const float* const* terms, int count, float scale) {
             Sum(terms, count, plane, scale, out + (b * X + x) * plane);
           });
  return ffi::Error::Success();
}

// Adam's update of n parameters p with gradient g and moments m, v, in place (see BoxAdamImpl).
void AdamInPlace(const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, float* __restrict__ p,
                 int64_t n, float one_minus_b1, float b1, float one_minus_b2, float b2, float c1, float c2, float eps,
                 float minus_lr) {
  for (int64_t i = 0; i < n; ++i) {
    m[i] = one_minus_b1 * g[i] + b1 * m[i];
    v[i] = one_minus_b2 * (g[i] * g[i]) + b2 * v[i];
    p[i] = p[i] + ((m[i] / c1) / (std::sqrt(v[i] / c2) + eps)) * minus_lr;
  }
}

// One Adam step (optax.adam, as refine._adam runs it) on parameters p whose loss sees their
// zero-padded box average: the gradient wrt p is the box average of `gradient` (the gradient wrt
// the averaged field; the zero-padded box is its own transpose), formed plane by plane (BoxSweep)
// and used at once: m = (1 - b1) g + b1 m, v = (1 - b2) g^2 + b2 v,
// p += ((m / c1) / (sqrt(v / c2) + eps)) * (-lr), with the bias corrections c1, c2 computed by the
// caller. m, v, p (B,X,Y,Z) are updated in place (aliased outputs). XLA wrote the averaged gradient
// and then read it, m, v and p in three passes.
ffi::Error BoxAdamImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gradient, ffi::Buffer<ffi::F32> corrections,
                       ffi::Buffer<ffi::F32> m_in, ffi::Buffer<ffi::F32> v_in, ffi::Buffer<ffi::F32> p_in,
                       ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out,
                       ffi::ResultBuffer<ffi::F32> p_out, int32_t size, float one_minus_b1, float b1,
                       float one_minus_b2, float b2, float eps, float minus_lr) {
  const auto d = gradient.dimensions();
  const int64_t n = gradient.element_count();
  if (d.size() != 4 || size < 1 || size % 2 != 1 || size > 2 * kMaxRadius + 1 || corrections.element_count() != 2 ||
      m_in.element_count() != n || v_in.element_count() != n || p_in.element_count() != n) {
    return ffi::Error::InvalidArgument("jaxreg_box_adam: gradient, m, v, p (B,X,Y,Z), corrections (2,), odd size");
  }
  const int64_t X = d[1], Y = d[2], Z = d[3], plane = Y * Z;
  const float c1 = corrections.typed_data()[0], c2 = corrections.typed_data()[1];
  const float* mi = m_in.typed_data();
  const float* vi = v_in.typed_data();
  const float* pi = p_in.typed_data();
  float* mo = m_out->typed_data();
  float* vo = v_out->typed_data();
  float* po = p_out->typed_data();
  BoxSweep(pool, gradient.typed_data(), d[0], X, Y, Z, size, 7, false,
           [=](int64_t b, int64_t x, const float* const* terms, int count, float scale) {
             thread_local std::vector<float> g;
             g.resize(plane);
             Sum(terms, count, plane, scale, g.data());
             const int64_t at = (b * X + x) * plane;
             if (mo != mi) std::copy(mi + at, mi + at + plane, mo + at);  // the outputs alias the inputs
             if (vo != vi) std::copy(vi + at, vi + at + plane, vo + at);  // when XLA can, and then
             if (po != pi) std::copy(pi + at, pi + at + plane, po + at);  // nothing is copied
             AdamInPlace(g.data(), mo + at, vo + at, po + at, plane, one_minus_b1, b1, one_minus_b2, b2, c1, c2, eps,
                         minus_lr);
           });
  return ffi::Error::Success();
}

// loss = 1 - mean cc and derivative (X,Y,Z) = d loss / d warped, cc the squared local correlation of
// fixed and warped over window^3 zero-padded boxes (refine._lncc_and_derivative, same formulas):
// A = box(f w) - fm box(w), C = box(w^2) - box(w)^2, cc = A^2 / (fv C + eps), and the derivative as
// boxes of d cc / d A and d cc / d C. Each task is a strip of rows (y) through the whole volume,
// swept along x with two rings of planes: the boxed sums of w, w^2 and f w (stage A), then the four
// derivative channels, boxed (stage B), so every plane of both stages is formed once; only the
// strip's margin rows are formed twice.
ffi::Error LnccImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> warped, ffi::Buffer<ffi::F32> fixed,
                    ffi::Buffer<ffi::F32> fixed_mean, ffi::Buffer<ffi::F32> fixed_var,
                    ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> derivative, int32_t window,
                    float epsilon) {
  const auto d = warped.dimensions();
  const int64_t count_all = warped.element_count();
  if (d.size() != 3 || fixed.element_count() != count_all || fixed_mean.element_count() != count_all ||
      fixed_var.element_count() != count_all || window < 1 || window % 2 != 1 || window > 2 * kMaxRadius + 1) {
    return ffi::Error::InvalidArgument("jaxreg_lncc: four (X,Y,Z) volumes and an odd window of at most 33");
  }
  const int64_t X = d[0], Y = d[1], Z = d[2], plane = Y * Z, r = window / 2, ring = 2 * r + 1;
  // one strip per thread (the margins cost the least so; 112 rows at LUMIR size on 2 cores: 24 ms a
  // call, against 28 ms with 56 rows and 33 ms with the earlier tiles of 16 planes x 32 rows)
  const int64_t span_y = (Y + std::max<int64_t>(1, pool.num_threads()) - 1) / std::max<int64_t>(1, pool.num_threads());
  const int64_t strips = (Y + span_y - 1) / span_y;
  const int ri = static_cast<int>(r);
  const float scale = 1.f / static_cast<float>(window), minus_inverse_count = -1.f / static_cast<float>(count_all);
  const float* w = warped.typed_data();
  const float* f = fixed.typed_data();
  const float* fm = fixed_mean.typed_data();
  const float* fv = fixed_var.typed_data();
  float* out = derivative->typed_data();
  std::vector<double> partial(strips, 0.0);
  ParallelFor(pool, strips, 1, [&](int64_t begin, int64_t end) {
    const float* terms[2 * kMaxRadius + 1];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t y0 = t * span_y, y1 = std::min(Y, y0 + span_y);
      const int64_t s0 = std::max<int64_t>(0, y0 - 2 * r), s1 = std::min(Y, y1 + 2 * r);  // rows read
      const int64_t q0 = std::max<int64_t>(0, y0 - r), q1 = std::min(Y, y1 + r);          // rows, stage A
      const int64_t na = (q1 - q0) * Z, nb = (y1 - y0) * Z, n = (s1 - s0) * Z;
      std::vector<float> ring_a(ring * 3 * na), ring_b(ring * 4 * nb), source(n), zsums(n), stats(3 * na),
          t4(4 * na), back(4 * nb);
      auto slot_a = [&](int64_t p, int c) { return ring_a.data() + ((p % ring) * 3 + c) * na; };
      auto slot_b = [&](int64_t p, int c) { return ring_b.data() + ((p % ring) * 4 + c) * nb; };
      double total = 0.0;
      for (int64_t p = 0; p < X + 2 * r; ++p) {
        if (p < X) {  // stage A, plane p: w, w^2 and f w, box-summed along z and y on rows [q0, q1)
          const float* wp = w + p * plane + s0 * Z;
          const float* fp = f + p * plane + s0 * Z;
          FilterRows(wp, s0, s1, q0, q1, Y, Z, ri, scale, ri, scale, false, zsums.data(), slot_a(p, 0));
          for (int64_t v = 0; v < n; ++v) source[v] = wp[v] * wp[v];
          FilterRows(source.data(), s0, s1, q0, q1, Y, Z, ri, scale, ri, scale, false, zsums.data(), slot_a(p, 1));
          for (int64_t v = 0; v < n; ++v) source[v] = fp[v] * wp[v];
          FilterRows(source.data(), s0, s1, q0, q1, Y, Z, ri, scale, ri, scale, false, zsums.data(), slot_a(p, 2));
        }
        const int64_t q = p - r;
        if (q >= 0 && q < X) {  // stage B, plane q: the local sums, cc and the four derivative channels
          for (int c = 0; c < 3; ++c) {
            int count = 0;
            for (int64_t a = std::max<int64_t>(0, q - r); a <= std::min(X - 1, q + r); ++a) terms[count++] = slot_a(a, c);
            Sum(terms, count, na, scale, stats.data() + c * na);
          }
          const float* mean = stats.data();
          const float* square = mean + na;
          const float* product = square + na;
          const float* fmq = fm + q * plane + q0 * Z;
          const float* fvq = fv + q * plane + q0 * Z;
          float* d0 = t4.data();
          float* d1 = d0 + na;
          float* d2 = d1 + na;
          float* d3 = d2 + na;
          for (int64_t v = 0; v < na; ++v) {
            const float cross = product[v] - fmq[v] * mean[v];
            const float inverse = 1.f / (fvq[v] * (square[v] - mean[v] * mean[v]) + epsilon);
            const float cc = cross * cross * inverse;
            const float d_cross = 2.f * cross * inverse;
            const float d_var = -cc * fvq[v] * inverse;
            d0[v] = d_cross, d1[v] = d_cross * fmq[v], d2[v] = d_var, d3[v] = d_var * mean[v];
            stats[v] = cc;  // the mean is read above only
          }
          float strip_cc = 0.f;
          for (int64_t v = (y0 - q0) * Z; v < (y1 - q0) * Z; ++v) strip_cc += stats[v];
          total += strip_cc;
          for (int c = 0; c < 4; ++c) {  // boxed along z and y on the strip's rows [y0, y1)
            FilterRows(t4.data() + c * na, q0, q1, y0, y1, Y, Z, ri, scale, ri, scale, false, zsums.data(), slot_b(q, c));
          }
        }
        const int64_t x = p - 2 * r;
        if (x >= 0) {  // plane x of the strip: the boxed derivative channels summed along x, then d loss / d w
          for (int c = 0; c < 4; ++c) {
            int count = 0;
            for (int64_t b = std::max<int64_t>(0, x - r); b <= std::min(X - 1, x + r); ++b) terms[count++] = slot_b(b, c);
            Sum(terms, count, nb, scale, back.data() + c * nb);
          }
          const float* fx = f + x * plane + y0 * Z;
          const float* wx = w + x * plane + y0 * Z;
          float* o = out + x * plane + y0 * Z;
          const float* k0 = back.data();
          const float* k1 = k0 + nb;
          const float* k2 = k1 + nb;
          const float* k3 = k2 + nb;
          for (int64_t v = 0; v < nb; ++v) {
            o[v] = (fx[v] * k0[v] - k1[v] + 2.f * (wx[v] * k2[v] - k3[v])) * minus_inverse_count;
          }
        }
      }
      partial[t] = total;
    }
  });
  double total = 0.0;
  for (double t : partial) total += t;
  *loss->typed_data() = static_cast<float>(1.0 - total / static_cast<double>(count_all));
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregBoxAdam, BoxAdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("size")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("minus_lr"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregWarpedSsd, WarpedSsdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregFoldMask, FoldMaskImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregCoupledArgmin, CoupledArgminImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("weight")
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregCostVolume, CostVolumeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregUnfold, UnfoldImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("rounds")
                                  .Attr<int32_t>("local_rounds")
                                  .Attr<int32_t>("grow")
                                  .Attr<float>("blend"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregMind, MindImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("radius")
                                  .Attr<int32_t>("factor"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregSample, SampleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("border"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregLncc, LnccImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("window")
                                  .Attr<float>("epsilon"));
