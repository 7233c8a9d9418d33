// The mathematics of the ICD loss that every backend shares: the scale and its clamp, the
// per-row statistics of the forward, and the gradient of the loss with respect to one pair
// of logits (L_ij, L_ji). The CPU kernel and the CUDA kernel both include this header, so a
// formula fixed here is fixed everywhere.
//
// Notation (README "How the fused operator works"):
//   L_ij = kappa <s_i, t_j>          (the bias b is dropped: it cancels in every softmax)
//   r_i  = logsumexp_j L_ij          (row log-sum-exp)
//   c_i  = logsumexp_j L_ji          (column log-sum-exp)
//   k_i  = sum_j Q_ij (log Q_ij - log P_ij)      with P_ij = e^(L_ij - r_i), Q_ij = e^(L_ji - c_i)
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define ICD_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernel compiles its tile loops for several vector ISAs, and only
// inlined callees take on the ISA of the loop that calls them.
#define ICD_HOST_DEVICE __attribute__((always_inline)) inline
#endif

namespace icd_fast {

// F.normalize's eps: rows are divided by max(||z||, eps).
constexpr double kNormEps = 1e-12;

// With the fixed shift M = kappa every exponent lies in [-2 kappa, 0]. Up to this scale the
// smallest possible term, e^(-2 kappa) >= e^-64 ~ 1.6e-28, is still a normal fp32 number, so
// no row or column sum can lose its leading terms; above it the kernels track a running
// maximum instead (the online path).
constexpr double kFixedShiftMaxScale = 32.0;

// kappa = clamp(exp(theta), 0, max_scale). NaN theta gives NaN kappa (and a NaN loss).
ICD_HOST_DEVICE double clamped_scale(double log_scale, double max_scale) {
  const double e = std::exp(log_scale);
  return e > max_scale ? max_scale : e;
}

// d kappa / d theta. torch.clamp passes the gradient at the bound itself, so the cut is
// strictly above max_scale.
ICD_HOST_DEVICE double scale_grad_factor(double log_scale, double max_scale) {
  const double e = std::exp(log_scale);
  return e > max_scale ? 0.0 : e;
}

// exp(x) for fp32 on the host, written as branch-free arithmetic so the compiler vectorises
// the loops that call it (glibc's expf is a scalar call). Range reduction x = n ln2 + r with
// a two-constant ln2 and a degree-6 polynomial for e^r: about 1 ulp on [-87, 88]. Results
// below e^-87 (~1.6e-38) flush to 0, which is harmless where every caller adds the terms to
// a sum that holds a term near 1. NaN stays NaN.
#if !defined(__CUDA_ARCH__)
ICD_HOST_DEVICE float exp_vectorizable(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
  const float kRound = 12582912.0f;
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = (xc * kLog2e + kRound) - kRound;  // in [-126, 127]: a normal power of two
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  const float result = x < -87.0f ? 0.0f : p * two_n;
  return x != x ? x : result;
}
#endif

template <typename T>
ICD_HOST_DEVICE T exp_acc(T x);

template <>
ICD_HOST_DEVICE float exp_acc<float>(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return exp_vectorizable(x);
#endif
}

// Arguments below -1000 (whose exponential is 0 in fp64 anyway) are raised to -1000: the
// vectorised libm exp that the compiler calls for SIMD loops converts its argument to a
// 64-bit integer on the way and returns garbage below about -9.2e18 (a logit gap at scales
// above ~1e19). NaN passes through (the comparison is false).
template <>
ICD_HOST_DEVICE double exp_acc<double>(double x) {
  return std::exp(x < -1000.0 ? -1000.0 : x);
}

// Running sums of exponentials are kept with a shift m, as sum e^(v - m). When a value v
// above the shift arrives, the shift moves up to v (the online softmax) and every sum taken
// with the old shift must be multiplied by the returned factor e^(m_old - v); otherwise the
// factor is 1. A NaN v leaves the shift alone (the NaN reaches the sums through e^(v - m)).
template <typename T>
ICD_HOST_DEVICE T raise_shift(T v, T& m) {
  if (!(v > m)) return T(1);
  const T factor = exp_acc<T>(m - v);
  m = v;
  return factor;
}

// Adds e^(v - m) to the running sum s with shift m. Starting from m = kappa instead of -inf
// makes the rescaling (almost) never happen while kappa <= kFixedShiftMaxScale.
template <typename T>
ICD_HOST_DEVICE void add_shifted(T v, T& m, T& s) {
  s *= raise_shift(v, m);
  s += exp_acc<T>(v - m);
}

// The common shift of two shifted sums and the factors that move each onto it; -inf shifts
// (empty sums) give factors without NaN.
template <typename T>
struct ShiftMerge {
  T shift, factor1, factor2;
};

template <typename T>
ICD_HOST_DEVICE ShiftMerge<T> merge_shifts(T m1, T m2) {
  const T m = m1 > m2 ? m1 : m2;
  return {m, m1 == m ? T(1) : exp_acc<T>(m1 - m), m2 == m ? T(1) : exp_acc<T>(m2 - m)};
}

// The per-row results of the forward pass, from the shifted sums
//   R_i = sum_j e^(L_ij - m_r)     C_i = sum_j e^(L_ji - m_c)
//   K_i = sum_j e^(L_ji - m_c) (L_ji - L_ij)
// where m_r, m_c are the shifts the sums were taken with (the fixed shift or a running max).
// K_i folds the two sums A_i - B_i of the design into one, which avoids their cancellation.
template <typename T>
struct RowStats {
  T row_lse;  // r_i
  T col_lse;  // c_i
  T row_kl;   // k_i
};

template <typename T>
ICD_HOST_DEVICE RowStats<T> finalize_row(double row_sum, double row_shift, double col_sum,
                                         double col_shift, double kl_sum) {
  RowStats<T> out;
  const double r = row_shift + std::log(row_sum);
  const double c = col_shift + std::log(col_sum);
  out.row_lse = static_cast<T>(r);
  out.col_lse = static_cast<T>(c);
  out.row_kl = static_cast<T>(kl_sum / col_sum - c + r);
  return out;
}

// The terms of one row that its logit gradients read: the forward's statistics and the
// upstream weights of the row's own loss terms. The loss differentiated is
//   sum_i (w_ce_i CE_i + w_kl_i k_i),
// which is w_ce CE + w_kl KL (times N) when every row has the same weights (one process), and
// a sum of per-rank shares, each with its own upstream weights, for the sharded loss.
template <typename T>
struct RowTerms {
  T r;     // row log-sum-exp r_i
  T c;     // column log-sum-exp c_i
  T k;     // the row's KL k_i
  T w_ce;  // weight of CE_i
  T w_kl;  // weight of k_i
};

// Gradient with respect to the logits L_ij and L_ji of one pair, given both logits, the
// terms of rows i and j, and the four probabilities
//   P_ij = e^(L_ij - r_i)   Q_ij = e^(L_ji - c_i)   Q_ji = e^(L_ij - c_j)   P_ji = e^(L_ji - r_j)
// (one call serves both entries of the pair because they share Q_ij and Q_ji). L_ij reaches
// the loss through CE_i and k_i (row i of L) and through k_j (column j of L), so
//   G_ij = w_ce_i (P_ij - d_ij) + w_kl_i (P_ij - Q_ij) + w_kl_j Q_ji (h_ji - k_j)
//   h_ji = log Q_ji - log P_ji = (L_ij - c_j) - (L_ji - r_j)
// and G_ji is the same with i and j exchanged.
template <typename T>
struct LogitGradPair {
  T ij;
  T ji;
};

template <typename T>
struct PairProbabilities {
  T p_ij, q_ij, q_ji, p_ji;
};

template <typename T>
ICD_HOST_DEVICE LogitGradPair<T> logit_grad_pair(T l_ij, T l_ji, const RowTerms<T>& row_i,
                                                 const RowTerms<T>& row_j,
                                                 PairProbabilities<T> pr, T is_diagonal) {
  const T h_ji = (l_ij - row_j.c) - (l_ji - row_j.r);
  const T h_ij = (l_ji - row_i.c) - (l_ij - row_i.r);
  LogitGradPair<T> g;
  g.ij = row_i.w_ce * (pr.p_ij - is_diagonal) + row_i.w_kl * (pr.p_ij - pr.q_ij) +
         row_j.w_kl * pr.q_ji * (h_ji - row_j.k);
  g.ji = row_j.w_ce * (pr.p_ji - is_diagonal) + row_j.w_kl * (pr.p_ji - pr.q_ji) +
         row_i.w_kl * pr.q_ij * (h_ij - row_i.k);
  return g;
}

// The four probabilities with four exponentials: valid for any scale.
template <typename T>
ICD_HOST_DEVICE PairProbabilities<T> pair_probabilities(T l_ij, T l_ji, T r_i, T c_i, T r_j,
                                                        T c_j) {
  return {exp_acc<T>(l_ij - r_i), exp_acc<T>(l_ji - c_i), exp_acc<T>(l_ij - c_j),
          exp_acc<T>(l_ji - r_j)};
}

// The same with two exponentials, through the fixed shift M = kappa:
//   P_ij = e^(L_ij - M) e^(M - r_i),   Q_ji = e^(L_ij - M) e^(M - c_j), ...
// where row_factor = e^(M - r) and col_factor = e^(M - c) are taken once per row. Valid while
// kappa <= kFixedShiftMaxScale: the factors stay below e^(2 kappa) and the shifted
// exponentials above e^(-2 kappa), so nothing overflows or underflows in fp32.
template <typename T>
ICD_HOST_DEVICE PairProbabilities<T> pair_probabilities_fixed_shift(
    T l_ij, T l_ji, T shift, T row_factor_i, T col_factor_i, T row_factor_j, T col_factor_j) {
  const T e_ij = exp_acc<T>(l_ij - shift);
  const T e_ji = exp_acc<T>(l_ji - shift);
  return {e_ij * row_factor_i, e_ji * col_factor_i, e_ij * col_factor_j, e_ji * row_factor_j};
}

// Backward of s = z / max(||z||, eps) for one row, given dS = dLoss/ds and <s, dS>.
template <typename T>
ICD_HOST_DEVICE T normalize_backward(T ds, T s, T s_dot_ds, T norm) {
  return norm >= static_cast<T>(kNormEps) ? (ds - s * s_dot_ds) / norm
                                          : ds / static_cast<T>(kNormEps);
}

}  // namespace icd_fast
