/* Group norm, ADM's scale-shift modulation and SiLU in two passes over a float32
 * channels-last tensor (unclip/nn.py, GroupNorm32.silu):
 *
 *   y[n, p, c] = silu(((x[n, p, c] - mean[n, g]) rstd[n, g] w[c] + b[c]) (1 + scale[n, c])
 *                      + shift[n, c]),   g = c / (C / G),  silu(v) = v / (1 + exp(-v))
 *
 * Pass 1 sums x - r and (x - r)^2 per channel over pixel blocks, r[n, c] = x[n, 0, c] (so a
 * large mean costs no precision), in float within a block of at most BLOCK pixels and double
 * across blocks, one block per thread at a time; the group statistics come from those sums
 * in double. Pass 2 is y = silu(a[n, c] (x - mean[n, g]) + d[n, c]), a and d folded from the
 * statistics, weights and modulation. Threads: `threads` of the OpenMP runtime torch runs on
 * (torch's intra-op count, passed in: OpenMP's own count is per calling thread).
 * C must be a multiple of LANES (unclip/native/__init__.py sets it); x and y are dense, weight
 * and bias dense [C], scale and shift [N, C] rows of dense channels, row n at n * its stride
 * (a stride of 0 broadcasts one row).
 */
#include <math.h>
#include <stdlib.h>

#ifndef LANES
#define LANES 8
#endif
#define BLOCK 64

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vfu __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int vi __attribute__((vector_size(LANES * 4)));
#define LOAD(p) (*(const vfu *)(p))
#define STORE(p, v) (*(vfu *)(p) = (v))

/* a where m is set, else b */
static inline vf pick(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

/* exp(v), v clamped to [-87, 88]: 2^k exp(r), k = round(v / ln 2) (by the 1.5 * 2^23 trick),
 * r = v - k ln 2 (ln 2 in two parts), exp(r) by its degree-6 Taylor polynomial on
 * |r| <= ln 2 / 2 (relative error under 2e-7). */
static inline vf vexp(vf v) {
  const vf zero = {0};
  v = pick(v < zero - 87.0f, zero - 87.0f, v);
  v = pick(v > zero + 88.0f, zero + 88.0f, v);
  const vf kf = (v * 1.44269504f + 12582912.0f) - 12582912.0f;
  const vf r = v - kf * 0.693145752f - kf * 1.42860677e-6f;
  vf p = zero + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(kf, vi) + 127) << 23;
  return p * (vf)bits;
}

static inline vf vsilu(vf v) { return v / (1.0f + vexp(-v)); }

/* x, y: [N, HW, C]; weight, bias: [C] or NULL (1, 0); scale, shift: [N, C] (row strides
 * scale_stride, shift_stride) or NULL (0, 0). y may be x. Returns 0, or -1 if scratch memory
 * could not be had (y untouched). */
int group_norm_silu(int threads, const float *x, float *y, int N, long HW, int C, int G,
                    const float *weight, const float *bias, const float *scale,
                    long scale_stride, const float *shift, long shift_stride, float eps,
                    int apply_silu) {
  const long blocks = (HW + BLOCK - 1) / BLOCK;
  double *sums = calloc((size_t)N * blocks * 2 * C, sizeof(double));
  float *fold = malloc((size_t)N * 3 * C * sizeof(float));
  if (!sums || !fold) {
    free(sums);
    free(fold);
    return -1;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long nb = 0; nb < (long)N * blocks; nb++) {
    const long n = nb / blocks, p0 = (nb % blocks) * BLOCK;
    const long p1 = p0 + BLOCK < HW ? p0 + BLOCK : HW;
    double *s = sums + nb * 2 * C;
    for (int c = 0; c < C; c += LANES) {
      const vf r = LOAD(x + n * HW * C + c);
      vf a = {0}, q = {0};
      for (long p = p0; p < p1; p++) {
        const vf v = LOAD(x + (n * HW + p) * C + c) - r;
        a += v;
        q += v * v;
      }
      for (int l = 0; l < LANES; l++) {
        s[c + l] = a[l];
        s[C + c + l] = q[l];
      }
    }
  }
  const int cg = C / G;
  for (int n = 0; n < N; n++)
    for (int g = 0; g < G; g++) {
      /* sums of x from the shifted ones: S1 + HW r and S2 + 2 r S1 + HW r^2 */
      double sum = 0, sq = 0;
      for (int c = g * cg; c < (g + 1) * cg; c++) {
        double s1 = 0, s2 = 0;
        for (long b = 0; b < blocks; b++) {
          const double *s = sums + ((long)n * blocks + b) * 2 * C;
          s1 += s[c];
          s2 += s[C + c];
        }
        const double r = x[(long)n * HW * C + c];
        sum += s1 + HW * r;
        sq += s2 + 2 * r * s1 + HW * r * r;
      }
      const double count = (double)HW * cg, mean = sum / count;
      double var = sq / count - mean * mean;
      var = var > 0 ? var : 0;
      const double rstd = 1.0 / sqrt(var + eps);
      float *f = fold + (long)n * 3 * C;
      for (int c = g * cg; c < (g + 1) * cg; c++) {
        const double w = weight ? weight[c] : 1.0, b = bias ? bias[c] : 0.0;
        const double m = scale ? 1.0 + scale[n * scale_stride + c] : 1.0;
        const double t = shift ? shift[n * shift_stride + c] : 0.0;
        f[c] = (float)mean;
        f[C + c] = (float)(rstd * w * m);
        f[2 * C + c] = (float)(b * m + t);
      }
    }
  free(sums);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long nb = 0; nb < (long)N * blocks; nb++) {
    const long n = nb / blocks, p0 = (nb % blocks) * BLOCK;
    const long p1 = p0 + BLOCK < HW ? p0 + BLOCK : HW;
    const float *f = fold + n * 3 * C;
    for (long p = p0; p < p1; p++)
      for (int c = 0; c < C; c += LANES) {
        const vf v = LOAD(x + (n * HW + p) * C + c);
        const vf u = LOAD(f + C + c) * (v - LOAD(f + c)) + LOAD(f + 2 * C + c);
        STORE(y + (n * HW + p) * C + c, apply_silu ? vsilu(u) : u);
      }
  }
  free(fold);
  return 0;
}
