/* Winograd F(4x4, 3x3) transforms (Lavin & Gray 2016, "Fast Algorithms for Convolutional
 * Neural Networks"), float32, channels-last: winograd_conv does a whole convolution (transforms
 * and products); a training step runs the transforms alone around torch.bmm (unclip/decoder/
 * winograd.py). Tiles are split over the threads of the OpenMP
 * runtime torch itself runs on (the process's libgomp), so torch.set_num_threads holds.
 *
 * Convolution with zero padding 1: y[n, p, q, k] = sum_{a,b,c} w[k, c, a, b] x[n, p+a-1, q+b-1, c],
 * x read as zero outside [0, H) x [0, W); the output is H x W (Ho x Wo below: the input's size,
 * or twice it when the input is read upsampled). Output tiles are 4x4, T = N ceil(Ho/4)
 * ceil(Wo/4) of them; tile t reads the 6x6 input patch whose top left is (4 ty - 1, 4 tx - 1).
 * C and K must be multiples of LANES (unclip/native/__init__.py sets it); every tensor is dense.
 * threads: how many OpenMP threads split the tiles (torch's intra-op count, passed in because
 * OpenMP's count is per calling thread).
 */
#include <stddef.h>
#include <stdlib.h>

#ifndef LANES
#define LANES 8
#endif
/* rows of tiles per product block (registers: MR x 2 accumulators) and tiles per block */
#define MR 6
#ifndef TILES
#define TILES 24
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vfu __attribute__((vector_size(LANES * 4), aligned(4)));
#define LOAD(p) (*(const vfu *)(p))
#define STORE(p, v) (*(vfu *)(p) = (v))

/* B^T d for a column d of six input rows */
static inline void input_rows(const vf d[6], vf u[6]) {
  u[0] = 4 * d[0] - 5 * d[2] + d[4];
  u[1] = -4 * d[1] - 4 * d[2] + d[3] + d[4];
  u[2] = 4 * d[1] - 4 * d[2] - d[3] + d[4];
  u[3] = -2 * d[1] - d[2] + 2 * d[3] + d[4];
  u[4] = 2 * d[1] - d[2] - 2 * d[3] + d[4];
  u[5] = 4 * d[1] - 5 * d[3] + d[5];
}

/* A^T m for a column m of six transformed rows */
static inline void output_rows(const vf m[6], vf o[4]) {
  const vf a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], e = m[3] - m[4];
  o[0] = m[0] + a + c;
  o[1] = b + 2 * e;
  o[2] = a + 4 * c;
  o[3] = b + 8 * e + m[5];
}

/* The transformed 6x6 input patch of tile t (B^T d B) into V: V[(6i+j) stride + c] for every
 * channel c, stride >= C. The input is read as the (H << up) x (W << up) map of x upsampled x2
 * (nearest) when up is 1 (so a convolution after a x2 upsampling never makes the upsampled
 * map), tiles over that map */
static inline void input_tile(const float *restrict x, float *restrict V, long stride, long t,
                              int H, int W, int C, int up) {
  const int Hu = H << up, Wu = W << up, tH = (Hu + 3) / 4, tW = (Wu + 3) / 4;
  const int n = t / (tH * tW), r = t % (tH * tW);
  const int y0 = (r / tW) * 4 - 1, x0 = (r % tW) * 4 - 1;
  const int inside = y0 >= 0 && x0 >= 0 && y0 + 6 <= Hu && x0 + 6 <= Wu;
  for (int c = 0; c < C; c += LANES) {
    vf u[6][6]; /* u[i][j] = (B^T d)[i, j] */
    for (int j = 0; j < 6; j++) {
      vf d[6], col[6];
      const int xx = x0 + j;
      for (int i = 0; i < 6; i++) {
        const int yy = y0 + i;
        if (inside || (yy >= 0 && yy < Hu && xx >= 0 && xx < Wu))
          d[i] = LOAD(x + (((long)n * H + (yy >> up)) * W + (xx >> up)) * C + c);
        else
          d[i] = (vf){0};
      }
      input_rows(d, col);
      for (int i = 0; i < 6; i++) u[i][j] = col[i];
    }
    for (int i = 0; i < 6; i++) {
      vf o[6];
      input_rows(u[i], o);
      for (int j = 0; j < 6; j++) STORE(V + (6 * i + j) * stride + c, o[j]);
    }
  }
}

/* x [N, H, W, C] -> V [36, T, C]: V[6i+j, t] = (B^T d_t B)[i, j] (input_tile) */
void winograd_input(int threads, const float *restrict x, float *restrict V, int N, int H, int W,
                    int C, int up) {
  const long T = (long)N * (((H << up) + 3) / 4) * (((W << up) + 3) / 4);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long t = 0; t < T; t++) input_tile(x, V + t * C, T * C, t, H, W, C, up);
}

/* Output tile t of y [N, Ho, Wo, K], channels [k0, k1), from M: y_t = A^T m_t A + bias + res_t,
 * m_t[6i+j] at M + (6i+j) stride (bias may be NULL; res, laid out as y, may be NULL) */
static inline void output_tile(const float *restrict M, long stride, const float *restrict bias,
                               const float *res, float *y, long t, int Ho, int Wo, int K, int k0,
                               int k1) {
  const int tH = (Ho + 3) / 4, tW = (Wo + 3) / 4;
  const int n = t / (tH * tW), r = t % (tH * tW);
  const int y0 = (r / tW) * 4, x0 = (r % tW) * 4;
  for (int k = k0; k < k1; k += LANES) {
    vf u[4][6]; /* u[i][j] = (A^T m)[i, j] */
    for (int j = 0; j < 6; j++) {
      vf m[6], col[4];
      for (int i = 0; i < 6; i++) m[i] = LOAD(M + (6 * i + j) * stride + k);
      output_rows(m, col);
      for (int i = 0; i < 4; i++) u[i][j] = col[i];
    }
    const vf b = bias ? LOAD(bias + k) : (vf){0};
    for (int i = 0; i < 4 && y0 + i < Ho; i++) {
      vf o[4];
      output_rows(u[i], o);
      for (int j = 0; j < 4 && x0 + j < Wo; j++) {
        const long at = (((long)n * Ho + y0 + i) * Wo + x0 + j) * K + k;
        STORE(y + at, res ? (o[j] + b) + LOAD(res + at) : o[j] + b);
      }
    }
  }
}

/* M [36, T, K] -> y [N, Ho, Wo, K]: y_t = A^T m_t A + bias (output_tile) */
void winograd_output(int threads, const float *restrict M, const float *restrict bias,
                     float *restrict y, int N, int Ho, int Wo, int K) {
  const long T = (long)N * ((Ho + 3) / 4) * ((Wo + 3) / 4);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long t = 0; t < T; t++) output_tile(M + t * K, T * K, bias, NULL, y, t, Ho, Wo, K, 0, K);
}

/* The products of one block of tiles: M[ξ][r, k] = sum_c V[ξ][r, c] U[ξ][c, k] for mr rows and
 * the nv vectors of columns of one panel of U (below), accumulated in registers over c (mr x nv
 * vectors; mr and nv are constants at each call, so the loops unroll) */
static inline __attribute__((always_inline)) void products(const float *restrict V,
                                                           const float *restrict U,
                                                           float *restrict M, int C, int K,
                                                           const int mr, const int nv) {
  vf acc[MR][2];
  for (int r = 0; r < mr; r++)
    for (int j = 0; j < nv; j++) acc[r][j] = (vf){0};
  for (int c = 0; c < C; c++) {
    vf b[2];
    for (int j = 0; j < nv; j++) b[j] = LOAD(U + (long)c * nv * LANES + j * LANES);
    for (int r = 0; r < mr; r++) {
      const float a = V[(long)r * C + c];
      for (int j = 0; j < nv; j++) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < mr; r++)
    for (int j = 0; j < nv; j++) STORE(M + (long)r * K + j * LANES, acc[r][j]);
}

#define PRODUCTS(R)                                                                              \
  case R:                                                                                        \
    if (nv == 2)                                                                                 \
      products(V, U, M, C, K, R, 2);                                                             \
    else                                                                                         \
      products(V, U, M, C, K, R, 1);                                                             \
    break;

static void products_any(const float *restrict V, const float *restrict U, float *restrict M,
                         int C, int K, int mr, int nv) {
  switch (mr) {
    PRODUCTS(1) PRODUCTS(2) PRODUCTS(3) PRODUCTS(4) PRODUCTS(5) PRODUCTS(6)
  }
}

/* A thread's scratch for one block of tiles, kept across calls (OpenMP's threads persist) */
static float *scratch(size_t floats) {
  static __thread float *buf = NULL;
  static __thread size_t size = 0;
  if (floats > size) {
    free(buf);
    buf = aligned_alloc(64, (floats * 4 + 63) / 64 * 64);
    size = buf ? floats : 0;
  }
  return buf;
}

/* The whole convolution in one pass: y = x * w + bias + res, x [N, H, W, C] (read upsampled x2
 * when up is 1), y and res [N, Ho, Wo, K] (bias and res may be NULL), U the
 * transformed kernels [36, C, K] in panels: for each ξ, the columns in blocks of 2 LANES (the
 * last may be LANES wide), each block stored [C, its width] after the previous, so the products
 * read U[ξ] once, in order (unclip/decoder/winograd.py, pack). Blocks of at most TILES
 * tiles are transformed into a thread's scratch, multiplied by U per ξ (products) and
 * transformed out, so V and M never leave the cache; where the blocks are fewer than the
 * threads, each block's output channels are split among several threads too. Returns 0, or -1
 * where a thread's scratch memory could not be had (y then holds only the other threads'
 * blocks: the caller discards it). */
int winograd_conv(int threads, const float *restrict x, const float *restrict U,
                  const float *restrict bias, const float *res, float *y, int N, int H, int W,
                  int C, int K, int up) {
  const int Ho = H << up, Wo = W << up;
  const long T = (long)N * ((Ho + 3) / 4) * ((Wo + 3) / 4);
  if (T == 0) return 0; /* an empty input: nothing to write */
  long tiles = (T + threads - 1) / threads;
  tiles = tiles < TILES ? tiles : TILES;
  const long blocks = (T + tiles - 1) / tiles;
  const int columns = (K + 2 * LANES - 1) / (2 * LANES); /* column blocks of 2 vectors */
  int parts = blocks >= threads ? 1 : (threads + blocks - 1) / blocks;
  parts = parts < columns ? parts : columns;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float *V = scratch(36 * tiles * (C + K)), *M = V + 36 * tiles * C;
    failed = V == NULL;
#pragma omp for schedule(static)
    for (long item = 0; item < blocks * parts; item++) {
      if (V == NULL) continue;
      const long t0 = item / parts * tiles, nt = T - t0 < tiles ? T - t0 : tiles;
      const int part = item % parts;
      const int k0 = columns * part / parts * 2 * LANES;
      const int k1 = columns * (part + 1) / parts * 2 * LANES < K
                         ? columns * (part + 1) / parts * 2 * LANES
                         : K;
      for (long r = 0; r < nt; r++) input_tile(x, V + r * C, nt * C, t0 + r, H, W, C, up);
      for (int xi = 0; xi < 36; xi++)
        for (int k = k0; k < k1; k += 2 * LANES)
          for (long r = 0; r < nt; r += MR)
            products_any(V + (xi * nt + r) * C, U + (long)xi * C * K + (long)k * C,
                         M + (xi * nt + r) * K + k, C, K, nt - r < MR ? nt - r : MR,
                         k1 - k >= 2 * LANES ? 2 : 1);
      for (long r = 0; r < nt; r++)
        output_tile(M + r * K, nt * K, bias, res, y, t0 + r, Ho, Wo, K, k0, k1);
    }
  }
  return failed ? -1 : 0;
}

/* A y for a column y of four output rows (the transpose of output_rows) */
static inline void output_grad_rows(const vf y[4], vf m[6]) {
  const vf a = y[0] + y[2], b = y[1] + y[3], c = y[0] + 4 * y[2], e = 2 * y[1] + 8 * y[3];
  m[0] = y[0];
  m[1] = a + b;
  m[2] = a - b;
  m[3] = c + e;
  m[4] = c - e;
  m[5] = y[3];
}

/* dy [N, Ho, Wo, K] -> dM [36, T, K]: dM_t = A dy_t A^T, the gradient of M in
 * winograd_output for the output gradient dy (positions past Ho, Wo are zero) */
void winograd_output_grad(int threads, const float *restrict dy, float *restrict dM, int N, int Ho, int Wo,
                          int K) {
  const int tH = (Ho + 3) / 4, tW = (Wo + 3) / 4;
  const long T = (long)N * tH * tW;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long t = 0; t < T; t++) {
    const int n = t / (tH * tW), r = t % (tH * tW);
    const int y0 = (r / tW) * 4, x0 = (r % tW) * 4;
    for (int k = 0; k < K; k += LANES) {
      vf u[6][4]; /* u[i][j] = (A dy)[i, j] */
      for (int j = 0; j < 4; j++) {
        vf d[4], col[6];
        for (int i = 0; i < 4; i++)
          d[i] = (y0 + i < Ho && x0 + j < Wo)
                     ? LOAD(dy + (((long)n * Ho + y0 + i) * Wo + x0 + j) * K + k)
                     : (vf){0};
        output_grad_rows(d, col);
        for (int i = 0; i < 6; i++) u[i][j] = col[i];
      }
      for (int i = 0; i < 6; i++) {
        vf o[6];
        output_grad_rows(u[i], o);
        for (int j = 0; j < 6; j++) STORE(dM + ((long)(6 * i + j) * T + t) * K + k, o[j]);
      }
    }
  }
}
