// Small row-major GEMM wrappers for the CPU kernels' tiles.
//
// They call the Fortran BLAS that libtorch_cpu exports (MKL or OpenBLAS), found at load time through
// weak symbols; a torch build without one falls back to plain loops, slower but correct.
#pragma once

#include <algorithm>
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace relattn {
namespace cpu {

// BLAS calls inside our parallel_for must stay on the calling thread: torch sets MKL's thread count to
// its own, and MKL would then start a nested team for every small tile GEMM (oversubscription).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int prev_;
};

// Column-major C[m×n] = alpha * op(A) * op(B) + beta * C, the BLAS convention.
template <typename T>
inline void gemm_colmajor_loops(char ta, char tb, int m, int n, int k, T alpha, const T* A, int lda,
                                const T* B, int ldb, T beta, T* C, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      T s = 0;
      for (int l = 0; l < k; ++l) {
        const T a = ta == 'N' ? A[i + static_cast<int64_t>(l) * lda] : A[l + static_cast<int64_t>(i) * lda];
        const T b = tb == 'N' ? B[l + static_cast<int64_t>(j) * ldb] : B[j + static_cast<int64_t>(l) * ldb];
        s += a * b;
      }
      T& c = C[i + static_cast<int64_t>(j) * ldc];
      c = beta == T(0) ? alpha * s : alpha * s + beta * c;
    }
  }
}

inline void gemm_colmajor(char ta, char tb, int m, int n, int k, float alpha, const float* A, int lda,
                          const float* B, int ldb, float beta, float* C, int ldc) {
  if (sgemm_ != nullptr) {
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc);
  } else {
    gemm_colmajor_loops(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

inline void gemm_colmajor(char ta, char tb, int m, int n, int k, double alpha, const double* A, int lda,
                          const double* B, int ldb, double beta, double* C, int ldc) {
  if (dgemm_ != nullptr) {
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc);
  } else {
    gemm_colmajor_loops(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

// Degenerate shapes BLAS would reject (ld < 1) or where beta*C must not read uninitialised memory.
template <typename T>
inline bool gemm_trivial(int64_t m, int64_t n, int64_t k, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return true;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return true;
  }
  return false;
}

// Row-major: C[m×n] = alpha * A[m×k] · B[n×k]ᵀ + beta * C
template <typename T>
inline void mm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                  T beta, T* C, int64_t ldc) {
  if (gemm_trivial(m, n, k, beta, C, ldc)) return;
  gemm_colmajor('T', 'N', int(n), int(m), int(k), alpha, B, int(ldb), A, int(lda), beta, C, int(ldc));
}

// Row-major: C[m×n] = alpha * A[m×k] · B[k×n] + beta * C
template <typename T>
inline void mm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                  T beta, T* C, int64_t ldc) {
  if (gemm_trivial(m, n, k, beta, C, ldc)) return;
  gemm_colmajor('N', 'N', int(n), int(m), int(k), alpha, B, int(ldb), A, int(lda), beta, C, int(ldc));
}

// Row-major: C[m×n] = alpha * A[k×m]ᵀ · B[k×n] + beta * C
template <typename T>
inline void mm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                  T beta, T* C, int64_t ldc) {
  if (gemm_trivial(m, n, k, beta, C, ldc)) return;
  gemm_colmajor('N', 'T', int(n), int(m), int(k), alpha, B, int(ldb), A, int(lda), beta, C, int(ldc));
}

}  // namespace cpu
}  // namespace relattn
