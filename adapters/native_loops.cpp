// The recompute training path's paper form (adapters/native.py): one loop per direction, no PyTorch headers.
#include <cstddef>
#include <cstdint>
#include <vector>
#include <omp.h>

// W' = W + M * W with M[i, j] = sum_k sr[i, k] * sl[chunk(i), k, j]; W, W' (out, in); sl (chunks, rank, in); sr (out, rank).
template <typename T>
static void weight(const T* W, const T* sl, const T* sr, T* Wp, int64_t out, int64_t in, int64_t chunks, int64_t rank) {
  const int64_t rows = out / chunks;
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < out; ++i) {
    const T* l = sl + (i / rows) * rank * in;
    const T* r = sr + i * rank;
    const T* w = W + i * in;
    T* o = Wp + i * in;
    if (rank == 1) {
      const T a = r[0];
      #pragma omp simd
      for (int64_t j = 0; j < in; ++j) { const T m = a * l[j]; o[j] = w[j] + m * w[j]; }
    } else {
      for (int64_t j = 0; j < in; ++j) {
        T m = 0;
        for (int64_t k = 0; k < rank; ++k) m += r[k] * l[k * in + j];
        o[j] = w[j] + m * w[j];
      }
    }
  }
}

// The same W', and given g = dL/dW': dM = g * W, dsr[i, k] = sum_j dM[i, j] sl[c, k, j], dsl[c, k, j] = sum_i sr[i, k] dM[i, j].
template <typename T>
static void weight_and_grads(const T* W, const T* sl, const T* sr, const T* g, T* Wp, T* dsl, T* dsr,
                             int64_t out, int64_t in, int64_t chunks, int64_t rank) {
  const int64_t rows = out / chunks, width = chunks * rank * in;
  const int threads = omp_get_max_threads();
  std::vector<T> partial(static_cast<size_t>(threads) * width, T(0));  // each thread's column sums
  #pragma omp parallel num_threads(threads)
  {
    T* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * width;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < out; ++i) {
      const int64_t c = i / rows;
      const T* l = sl + c * rank * in;
      T* column = mine + c * rank * in;
      const T* r = sr + i * rank;
      const T* w = W + i * in;
      const T* gi = g + i * in;
      T* o = Wp + i * in;
      if (rank == 1) {
        const T a = r[0];
        T row = 0;
        #pragma omp simd reduction(+:row)
        for (int64_t j = 0; j < in; ++j) {
          const T wj = w[j], m = a * l[j], p = gi[j] * wj;
          o[j] = wj + m * wj;
          row += p * l[j];
          column[j] += p * a;
        }
        dsr[i] = row;
      } else {
        for (int64_t k = 0; k < rank; ++k) dsr[i * rank + k] = 0;
        for (int64_t j = 0; j < in; ++j) {
          T m = 0;
          for (int64_t k = 0; k < rank; ++k) m += r[k] * l[k * in + j];
          const T wj = w[j], p = gi[j] * wj;
          o[j] = wj + m * wj;
          for (int64_t k = 0; k < rank; ++k) { dsr[i * rank + k] += p * l[k * in + j]; column[k * in + j] += p * r[k]; }
        }
      }
    }
  }
  for (int64_t e = 0; e < width; ++e) {
    T s = 0;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * width + e];
    dsl[e] = s;
  }
}

extern "C" {
void rlrr_weight_f32(const float* W, const float* sl, const float* sr, float* Wp, int64_t o, int64_t i, int64_t c, int64_t r) { weight(W, sl, sr, Wp, o, i, c, r); }
void rlrr_weight_f64(const double* W, const double* sl, const double* sr, double* Wp, int64_t o, int64_t i, int64_t c, int64_t r) { weight(W, sl, sr, Wp, o, i, c, r); }
void rlrr_weight_and_grads_f32(const float* W, const float* sl, const float* sr, const float* g, float* Wp, float* dsl, float* dsr,
                               int64_t o, int64_t i, int64_t c, int64_t r) { weight_and_grads(W, sl, sr, g, Wp, dsl, dsr, o, i, c, r); }
void rlrr_weight_and_grads_f64(const double* W, const double* sl, const double* sr, const double* g, double* Wp, double* dsl, double* dsr,
                               int64_t o, int64_t i, int64_t c, int64_t r) { weight_and_grads(W, sl, sr, g, Wp, dsl, dsr, o, i, c, r); }
}
