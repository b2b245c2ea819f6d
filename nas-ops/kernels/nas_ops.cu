// CUDA twins of the CPU custom ops in nas-ops/src/kernels/ (compiled to PTX by build.rs
// under the `cuda` feature and launched from nas-ops/src/kernels/cuda.rs).
//
// Every kernel exists for float (`_f32`) and double (`_f64`). Layouts are contiguous
// row-major NCHW. Element-wise and gather kernels use grid-stride loops over 64-bit indices
// and write every output element exactly once (no atomics, so results do not depend on
// scheduling). Reductions (the depthwise weight gradient, batch-norm statistics and its
// backward sums) use one block per output value and accumulate in double.
//
// Semantics follow the CPU kernels exactly:
// - depthwise: TF SAME padding given per side, stride on both axes, dilation; with
//   `relu_in` the input is read through max(x, 0) (the input gradient is masked by the
//   caller with candle's ReLU rule, x >= 0);
// - max pooling ignores padding and gives ties (and the gradient) to the first element of
//   the window in row-major order; average pooling divides by the real elements only;
// - batch norm: biased batch variance, statistics in double.

#include <stdint.h>

#define NAS_BLOCK 256

struct DwGeom {
  int n, c, h, w, kh, kw, ho, wo, stride, dilation, pad_top, pad_left;
};

struct PoolGeom {
  int n, c, h, w, ho, wo, kernel, stride, pad_top, pad_left;
};

#define GRID_STRIDE_LOOP(i, total)                                                     \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total);   \
       i += (long long)gridDim.x * blockDim.x)

template <typename T>
__device__ __forceinline__ T relu_read(T v, int relu) {
  return (relu && !(v >= T(0))) ? T(0) : v;
}

// Sum of `v` over the block (blockDim.x == NAS_BLOCK); the result is valid in thread 0.
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = NAS_BLOCK / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  double out = shared[0];
  __syncthreads();
  return out;
}

// ---------------------------------------------------------------- depthwise convolution

// y[n, c, oh, ow] = sum_{ki, kj} x[n, c, oh*s + ki*d - pt, ow*s + kj*d - pl] * w[c, ki, kj]
template <typename T>
__device__ void dw_fwd(const T* x, const T* wt, T* y, DwGeom g, int relu_in) {
  const long long total = (long long)g.n * g.c * g.ho * g.wo;
  GRID_STRIDE_LOOP(i, total) {
    const int ow = (int)(i % g.wo);
    long long t = i / g.wo;
    const int oh = (int)(t % g.ho);
    t /= g.ho;
    const int ch = (int)(t % g.c);
    const long long plane = t;  // n * c + ch
    const T* xp = x + plane * g.h * g.w;
    const T* wp = wt + (long long)ch * g.kh * g.kw;
    T acc = T(0);
    for (int ki = 0; ki < g.kh; ++ki) {
      const int ih = oh * g.stride + ki * g.dilation - g.pad_top;
      if (ih < 0 || ih >= g.h) continue;
      for (int kj = 0; kj < g.kw; ++kj) {
        const int iw = ow * g.stride + kj * g.dilation - g.pad_left;
        if (iw < 0 || iw >= g.w) continue;
        acc += relu_read(xp[(long long)ih * g.w + iw], relu_in) * wp[ki * g.kw + kj];
      }
    }
    y[i] = acc;
  }
}

// dx[n, c, ih, iw] = sum over the outputs that read (ih, iw) of dy * w, gathered.
template <typename T>
__device__ void dw_bwd_input(const T* dy, const T* wt, T* dx, DwGeom g) {
  const long long total = (long long)g.n * g.c * g.h * g.w;
  GRID_STRIDE_LOOP(i, total) {
    const int iw = (int)(i % g.w);
    long long t = i / g.w;
    const int ih = (int)(t % g.h);
    t /= g.h;
    const int ch = (int)(t % g.c);
    const T* dyp = dy + t * g.ho * g.wo;
    const T* wp = wt + (long long)ch * g.kh * g.kw;
    T acc = T(0);
    for (int ki = 0; ki < g.kh; ++ki) {
      const int ph = ih + g.pad_top - ki * g.dilation;  // oh * stride
      if (ph < 0 || ph % g.stride != 0) continue;
      const int oh = ph / g.stride;
      if (oh >= g.ho) continue;
      for (int kj = 0; kj < g.kw; ++kj) {
        const int pw = iw + g.pad_left - kj * g.dilation;
        if (pw < 0 || pw % g.stride != 0) continue;
        const int ow = pw / g.stride;
        if (ow >= g.wo) continue;
        acc += dyp[(long long)oh * g.wo + ow] * wp[ki * g.kw + kj];
      }
    }
    dx[i] = acc;
  }
}

// dw[c, ki, kj] = sum_{n, oh, ow} dy[n, c, oh, ow] * x[n, c, ih, iw]: one block per tap.
template <typename T>
__device__ void dw_bwd_weight(const T* x, const T* dy, T* dw, DwGeom g, int relu_in) {
  __shared__ double shared[NAS_BLOCK];
  const int taps = g.kh * g.kw;
  for (long long tap = blockIdx.x; tap < (long long)g.c * taps; tap += gridDim.x) {
    const int ch = (int)(tap / taps);
    const int ki = (int)(tap % taps) / g.kw;
    const int kj = (int)(tap % taps) % g.kw;
    const long long per_sample = (long long)g.ho * g.wo;
    double acc = 0.0;
    for (long long j = threadIdx.x; j < (long long)g.n * per_sample; j += blockDim.x) {
      const int nn = (int)(j / per_sample);
      const int o = (int)(j % per_sample);
      const int oh = o / g.wo, ow = o % g.wo;
      const int ih = oh * g.stride + ki * g.dilation - g.pad_top;
      const int iw = ow * g.stride + kj * g.dilation - g.pad_left;
      if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
      const long long plane = (long long)nn * g.c + ch;
      const T xv = relu_read(x[(plane * g.h + ih) * g.w + iw], relu_in);
      acc += (double)dy[plane * per_sample + o] * (double)xv;
    }
    const double sum = block_sum(acc, shared);
    if (threadIdx.x == 0) dw[tap] = (T)sum;
  }
}

// ---------------------------------------------------------------------------- pooling

__device__ __forceinline__ void window(int o, int kernel, int stride, int before, int n, int* lo,
                                       int* hi) {
  const int start = o * stride - before;
  *lo = start < 0 ? 0 : start;
  *hi = start + kernel < n ? start + kernel : n;
}

// The first maximum of the window of output (oh, ow) in plane `xp`, as a flat position.
template <typename T>
__device__ __forceinline__ int window_argmax(const T* xp, int oh, int ow, PoolGeom g, T* best_out) {
  int h0, h1, w0, w1;
  window(oh, g.kernel, g.stride, g.pad_top, g.h, &h0, &h1);
  window(ow, g.kernel, g.stride, g.pad_left, g.w, &w0, &w1);
  int arg = h0 * g.w + w0;
  T best = xp[arg];
  for (int ih = h0; ih < h1; ++ih) {
    for (int iw = w0; iw < w1; ++iw) {
      const T v = xp[ih * g.w + iw];
      if (v > best) {
        best = v;
        arg = ih * g.w + iw;
      }
    }
  }
  *best_out = best;
  return arg;
}

template <typename T>
__device__ void max_pool_fwd(const T* x, T* y, PoolGeom g) {
  const long long total = (long long)g.n * g.c * g.ho * g.wo;
  GRID_STRIDE_LOOP(i, total) {
    const int ow = (int)(i % g.wo);
    const long long t = i / g.wo;
    const int oh = (int)(t % g.ho);
    const long long plane = t / g.ho;
    T best;
    window_argmax(x + plane * g.h * g.w, oh, ow, g, &best);
    y[i] = best;
  }
}

// The outputs whose windows hold input `i` along one axis: [lo, hi).
__device__ __forceinline__ void outputs_reading(int i, int kernel, int stride, int before, int n_out,
                                                int* lo, int* hi) {
  const int p = i + before;  // position in the padded axis
  const int first = p - kernel + 1 <= 0 ? 0 : (p - kernel + 1 + stride - 1) / stride;
  const int last = p / stride;  // inclusive
  *lo = first;
  *hi = last + 1 < n_out ? last + 1 : n_out;
}

template <typename T>
__device__ void max_pool_bwd(const T* x, const T* dy, T* dx, PoolGeom g) {
  const long long total = (long long)g.n * g.c * g.h * g.w;
  GRID_STRIDE_LOOP(i, total) {
    const int iw = (int)(i % g.w);
    const long long t = i / g.w;
    const int ih = (int)(t % g.h);
    const long long plane = t / g.h;
    const T* xp = x + plane * g.h * g.w;
    const T* dyp = dy + plane * g.ho * g.wo;
    int oh0, oh1, ow0, ow1;
    outputs_reading(ih, g.kernel, g.stride, g.pad_top, g.ho, &oh0, &oh1);
    outputs_reading(iw, g.kernel, g.stride, g.pad_left, g.wo, &ow0, &ow1);
    T acc = T(0);
    const int me = ih * g.w + iw;
    for (int oh = oh0; oh < oh1; ++oh) {
      for (int ow = ow0; ow < ow1; ++ow) {
        T best;
        if (window_argmax(xp, oh, ow, g, &best) == me) acc += dyp[oh * g.wo + ow];
      }
    }
    dx[i] = acc;
  }
}

__device__ __forceinline__ int window_count(int oh, int ow, PoolGeom g) {
  int h0, h1, w0, w1;
  window(oh, g.kernel, g.stride, g.pad_top, g.h, &h0, &h1);
  window(ow, g.kernel, g.stride, g.pad_left, g.w, &w0, &w1);
  return (h1 - h0) * (w1 - w0);
}

template <typename T>
__device__ void avg_pool_fwd(const T* x, T* y, PoolGeom g) {
  const long long total = (long long)g.n * g.c * g.ho * g.wo;
  GRID_STRIDE_LOOP(i, total) {
    const int ow = (int)(i % g.wo);
    const long long t = i / g.wo;
    const int oh = (int)(t % g.ho);
    const T* xp = x + (t / g.ho) * g.h * g.w;
    int h0, h1, w0, w1;
    window(oh, g.kernel, g.stride, g.pad_top, g.h, &h0, &h1);
    window(ow, g.kernel, g.stride, g.pad_left, g.w, &w0, &w1);
    T acc = T(0);
    for (int ih = h0; ih < h1; ++ih)
      for (int iw = w0; iw < w1; ++iw) acc += xp[ih * g.w + iw];
    y[i] = acc / T((h1 - h0) * (w1 - w0));
  }
}

template <typename T>
__device__ void avg_pool_bwd(const T* dy, T* dx, PoolGeom g) {
  const long long total = (long long)g.n * g.c * g.h * g.w;
  GRID_STRIDE_LOOP(i, total) {
    const int iw = (int)(i % g.w);
    const long long t = i / g.w;
    const int ih = (int)(t % g.h);
    const T* dyp = dy + (t / g.h) * g.ho * g.wo;
    int oh0, oh1, ow0, ow1;
    outputs_reading(ih, g.kernel, g.stride, g.pad_top, g.ho, &oh0, &oh1);
    outputs_reading(iw, g.kernel, g.stride, g.pad_left, g.wo, &ow0, &ow1);
    T acc = T(0);
    for (int oh = oh0; oh < oh1; ++oh)
      for (int ow = ow0; ow < ow1; ++ow) acc += dyp[oh * g.wo + ow] / T(window_count(oh, ow, g));
    dx[i] = acc;
  }
}

// ------------------------------------------------------------------------- batch norm

// stats[c] = mean, stats[C + c] = biased variance of channel c (two passes, in double).
template <typename T>
__device__ void bn_stats(const T* x, double* stats, int n, int c, long long hw) {
  __shared__ double shared[NAS_BLOCK];
  const long long m = (long long)n * hw;
  for (int ch = blockIdx.x; ch < c; ch += gridDim.x) {
    double acc = 0.0;
    for (long long j = threadIdx.x; j < m; j += blockDim.x)
      acc += (double)x[((j / hw) * c + ch) * hw + j % hw];
    const double mean = block_sum(acc, shared) / (double)m;
    acc = 0.0;
    for (long long j = threadIdx.x; j < m; j += blockDim.x) {
      const double d = (double)x[((j / hw) * c + ch) * hw + j % hw] - mean;
      acc += d * d;
    }
    const double var = block_sum(acc, shared) / (double)m;
    if (threadIdx.x == 0) {
      stats[ch] = mean;
      stats[c + ch] = var;
    }
  }
}

// y = (x - mean) * invstd * gamma + beta, then max(y, 0) with `relu`.
template <typename T>
__device__ void bn_fwd(const T* x, const T* gamma, const T* beta, const double* mean,
                       const double* invstd, T* y, int n, int c, long long hw, int relu) {
  const long long total = (long long)n * c * hw;
  GRID_STRIDE_LOOP(i, total) {
    const int ch = (int)((i / hw) % c);
    const double v = ((double)x[i] - mean[ch]) * invstd[ch] * (double)gamma[ch] + (double)beta[ch];
    y[i] = (relu && !(v >= 0.0)) ? T(0) : (T)v;
  }
}

// sums[c] = sum(dy), sums[C + c] = sum(dy * xhat) per channel.
template <typename T>
__device__ void bn_bwd_sums(const T* x, const T* dy, const double* mean, const double* invstd,
                            double* sums, int n, int c, long long hw) {
  __shared__ double shared[NAS_BLOCK];
  const long long m = (long long)n * hw;
  for (int ch = blockIdx.x; ch < c; ch += gridDim.x) {
    double s_dy = 0.0, s_dyx = 0.0;
    for (long long j = threadIdx.x; j < m; j += blockDim.x) {
      const long long k = ((j / hw) * c + ch) * hw + j % hw;
      const double d = (double)dy[k];
      s_dy += d;
      s_dyx += d * ((double)x[k] - mean[ch]) * invstd[ch];
    }
    const double a = block_sum(s_dy, shared);
    const double b = block_sum(s_dyx, shared);
    if (threadIdx.x == 0) {
      sums[ch] = a;
      sums[c + ch] = b;
    }
  }
}

// packed = [dx (N*C*HW), dgamma (C), dbeta (C)] with
// dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma).
template <typename T>
__device__ void bn_bwd_dx(const T* x, const T* gamma, const T* dy, const double* mean,
                          const double* invstd, const double* sums, T* packed, int n, int c,
                          long long hw) {
  const long long total = (long long)n * c * hw;
  const double m = (double)((long long)n * hw);
  GRID_STRIDE_LOOP(i, total + 2 * c) {
    if (i >= total) {
      const long long k = i - total;  // dgamma first, then dbeta
      packed[i] = k < c ? (T)sums[c + k] : (T)sums[k - c];
      continue;
    }
    const int ch = (int)((i / hw) % c);
    const double xhat = ((double)x[i] - mean[ch]) * invstd[ch];
    packed[i] = (T)((double)gamma[ch] * invstd[ch] / m *
                    (m * (double)dy[i] - sums[ch] - xhat * sums[c + ch]));
  }
}

// ------------------------------------------------------------------------- drop path

// y = a * sa[n] + b * sb[n] (per-example scales; a null scale is 1).
template <typename T>
__device__ void scaled_add(const T* a, const T* sa, const T* b, const T* sb, T* y, long long per_example,
                           long long total) {
  GRID_STRIDE_LOOP(i, total) {
    const long long e = i / per_example;
    const T av = sa == nullptr ? a[i] : a[i] * sa[e];
    const T bv = sb == nullptr ? b[i] : b[i] * sb[e];
    y[i] = av + bv;
  }
}

// ---------------------------------------------------------------- exported entry points

#define EXPORT(T, SUFFIX)                                                                          \
  extern "C" __global__ void dw_fwd_##SUFFIX(const T* x, const T* w, T* y, DwGeom g, int relu_in) { \
    dw_fwd<T>(x, w, y, g, relu_in);                                                                \
  }                                                                                                \
  extern "C" __global__ void dw_bwd_input_##SUFFIX(const T* dy, const T* w, T* dx, DwGeom g) {     \
    dw_bwd_input<T>(dy, w, dx, g);                                                                 \
  }                                                                                                \
  extern "C" __global__ void dw_bwd_weight_##SUFFIX(const T* x, const T* dy, T* dw, DwGeom g,       \
                                                    int relu_in) {                                 \
    dw_bwd_weight<T>(x, dy, dw, g, relu_in);                                                       \
  }                                                                                                \
  extern "C" __global__ void max_pool_fwd_##SUFFIX(const T* x, T* y, PoolGeom g) {                 \
    max_pool_fwd<T>(x, y, g);                                                                      \
  }                                                                                                \
  extern "C" __global__ void max_pool_bwd_##SUFFIX(const T* x, const T* dy, T* dx, PoolGeom g) {   \
    max_pool_bwd<T>(x, dy, dx, g);                                                                 \
  }                                                                                                \
  extern "C" __global__ void avg_pool_fwd_##SUFFIX(const T* x, T* y, PoolGeom g) {                 \
    avg_pool_fwd<T>(x, y, g);                                                                      \
  }                                                                                                \
  extern "C" __global__ void avg_pool_bwd_##SUFFIX(const T* dy, T* dx, PoolGeom g) {               \
    avg_pool_bwd<T>(dy, dx, g);                                                                    \
  }                                                                                                \
  extern "C" __global__ void bn_stats_##SUFFIX(const T* x, double* stats, int n, int c,            \
                                               long long hw) {                                     \
    bn_stats<T>(x, stats, n, c, hw);                                                               \
  }                                                                                                \
  extern "C" __global__ void bn_fwd_##SUFFIX(const T* x, const T* gamma, const T* beta,            \
                                             const double* mean, const double* invstd, T* y,       \
                                             int n, int c, long long hw, int relu) {               \
    bn_fwd<T>(x, gamma, beta, mean, invstd, y, n, c, hw, relu);                                    \
  }                                                                                                \
  extern "C" __global__ void bn_bwd_sums_##SUFFIX(const T* x, const T* dy, const double* mean,     \
                                                  const double* invstd, double* sums, int n,       \
                                                  int c, long long hw) {                           \
    bn_bwd_sums<T>(x, dy, mean, invstd, sums, n, c, hw);                                           \
  }                                                                                                \
  extern "C" __global__ void bn_bwd_dx_##SUFFIX(const T* x, const T* gamma, const T* dy,           \
                                                const double* mean, const double* invstd,          \
                                                const double* sums, T* packed, int n, int c,       \
                                                long long hw) {                                    \
    bn_bwd_dx<T>(x, gamma, dy, mean, invstd, sums, packed, n, c, hw);                              \
  }                                                                                                \
  extern "C" __global__ void scaled_add_##SUFFIX(const T* a, const T* sa, const T* b, const T* sb, \
                                                 T* y, long long per_example, long long total) {   \
    scaled_add<T>(a, sa, b, sb, y, per_example, total);                                            \
  }

EXPORT(float, f32)
EXPORT(double, f64)
