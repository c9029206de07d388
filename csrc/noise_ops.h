// Shared by the CPU (noise_ops.cpp) and CUDA (cuda/noise_ops.cu) implementations of the layoutgen noise ops:
// the per-sample coefficients of the DDPM / DDIM steps, the Philox4x32-10 generator with Box-Muller, and the
// argument checks. Everything here is plain C++ that both g++ and nvcc compile (LG_HD marks host+device functions).
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LG_HD __host__ __device__ __forceinline__
#define LG_UNROLL _Pragma("unroll")
#else
#define LG_HD inline
#define LG_UNROLL
#endif

namespace layoutgen {

// What the model predicts (diffusers' prediction_type): the noise, v = sqrt(acp) eps - sqrt(1 - acp) x0, or x0.
enum class Prediction : int { kEpsilon = 0, kV = 1, kSample = 2 };

// ------------------------------------------------------------------------------------------------------------------
// Per-sample coefficients of one reverse step. Computed in double (1 - acp near t = 0 keeps few digits in float),
// then rounded to the elementwise type acc_t, exactly as the PyTorch references in kernels/noise_ops.py do.
//   sa = sqrt(acp[t]), s1m = sqrt(1 - acp[t])       (to turn the model output into x0 and eps)
//   x_prev = c0 * x0 + c1 * (x_t for DDPM, eps for DDIM) + cz * variance_noise
// ------------------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct StepCoefs {
  acc_t sa, s1m, c0, c1, cz;
};

// DDPM (Ho et al. 2020, eqs. 6-7) with the jump t -> prev_t: beta' = 1 - acp_t / acp_prev; posterior mean
// coefficients and std ("fixed_small": the posterior variance clamped at 1e-20; "fixed_large": beta'); no noise at t=0.
template <typename acc_t>
LG_HD StepCoefs<acc_t> ddpm_coefs(double acp_t, double acp_prev, bool t_positive, bool fixed_small) {
  const double beta_prod_t = 1.0 - acp_t;
  const double beta_prod_prev = 1.0 - acp_prev;
  const double alpha_jump = acp_t / acp_prev;
  const double beta_jump = 1.0 - alpha_jump;
  StepCoefs<acc_t> c;
  c.sa = static_cast<acc_t>(sqrt(acp_t));
  c.s1m = static_cast<acc_t>(sqrt(beta_prod_t));
  c.c0 = static_cast<acc_t>(sqrt(acp_prev) * beta_jump / beta_prod_t);
  c.c1 = static_cast<acc_t>(sqrt(alpha_jump) * beta_prod_prev / beta_prod_t);
  double variance = fixed_small ? beta_prod_prev / beta_prod_t * beta_jump : beta_jump;
  if (fixed_small && !(variance >= 1e-20)) variance = 1e-20;
  c.cz = t_positive ? static_cast<acc_t>(sqrt(variance)) : acc_t(0);
  return c;
}

// DDIM (Song et al. 2021, eqs. 12 and 16): sigma = eta sqrt((1 - acp_prev) / (1 - acp_t) (1 - acp_t / acp_prev)),
// x_prev = sqrt(acp_prev) x0 + sqrt(1 - acp_prev - sigma^2) eps + sigma z.
template <typename acc_t>
LG_HD StepCoefs<acc_t> ddim_coefs(double acp_t, double acp_prev, double eta) {
  const double beta_prod_t = 1.0 - acp_t;
  const double beta_prod_prev = 1.0 - acp_prev;
  const double variance = beta_prod_prev / beta_prod_t * (1.0 - acp_t / acp_prev);
  const double sigma = eta * sqrt(variance);
  double direction = 1.0 - acp_prev - sigma * sigma;
  if (!(direction >= 0.0)) direction = 0.0;  // only rounding: eta <= 1 keeps it >= 0
  StepCoefs<acc_t> c;
  c.sa = static_cast<acc_t>(sqrt(acp_t));
  c.s1m = static_cast<acc_t>(sqrt(beta_prod_t));
  c.c0 = static_cast<acc_t>(sqrt(acp_prev));
  c.c1 = static_cast<acc_t>(sqrt(direction));
  c.cz = static_cast<acc_t>(sigma);
  return c;
}

// clamp for a scalar; noise_ops.cpp specialises it for at::vec::Vectorized. NaN stays NaN, as with torch.clamp.
template <typename V>
struct Clamp {
  static LG_HD V apply(const V& x, const V& lo, const V& hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

// One step for one element (V = acc_t, or a vector of acc_t on the CPU), with the operations of the references in
// the same order: x0 and eps from the model output (inverting x_t = sa x0 + s1m eps and v = sa eps - s1m x0),
// optional clipping of x0 (DDIM then recomputes eps from the clipped x0), and the mean c0 x0 + c1 (x_t or eps).
// Writes x0 and returns the mean; the caller adds cz * variance_noise.
template <typename V>
LG_HD V step_mean(const V& m, const V& x, const V& sa, const V& s1m, const V& c0, const V& c1, Prediction pred,
                  bool ddim, bool clip, const V& lo, const V& hi, V* x0_out) {
  V x0 = pred == Prediction::kEpsilon ? (x - s1m * m) / sa : (pred == Prediction::kV ? sa * x - s1m * m : m);
  V eps = m;
  if (ddim && pred != Prediction::kEpsilon) {
    eps = pred == Prediction::kV ? sa * m + s1m * x : (x - sa * m) / s1m;
  }
  if (clip) {
    x0 = Clamp<V>::apply(x0, lo, hi);
    if (ddim) eps = (x - sa * x0) / s1m;
  }
  *x0_out = x0;
  return c0 * x0 + c1 * (ddim ? eps : x);
}

// ------------------------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), the counter-based generator of
// cuRAND and PyTorch, with the same constants and round function as at::Philox4_32. Counter-based: the numbers of
// element i depend on (seed, offset, i) only, so any thread layout gives the same stream.
// Element p of a tensor (in memory order) takes normal number p % 4 of the block counter (p / 4, offset), key seed.
// ------------------------------------------------------------------------------------------------------------------
struct Philox4 {
  uint32_t v[4];
};

LG_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

LG_HD Philox4 philox4x32_10(uint64_t block, uint64_t offset, uint64_t seed) {
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
LG_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kW0; k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A uniform in (0, 1) from the top 24 bits (never 0, so the log below is finite).
LG_HD float uniform_open(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;  // 2^-24, 2^-25
}

// Four standard normals from one Philox block: Box-Muller on the pairs (v0, v1) and (v2, v3), in float.
LG_HD void box_muller4(const Philox4& r, float out[4]) {
  constexpr float kTwoPi = 6.283185307179586f;
LG_UNROLL
  for (int pair = 0; pair < 2; ++pair) {
    const float radius = sqrtf(-2.0f * logf(uniform_open(r.v[2 * pair])));
    const float angle = kTwoPi * uniform_open(r.v[2 * pair + 1]);
    float s, c;
    sincosf(angle, &s, &c);
    out[2 * pair] = radius * c;
    out[2 * pair + 1] = radius * s;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Argument checks shared by the CPU and CUDA ops (defined in noise_ops.cpp). Each TORCH_CHECK names the op and the
// argument at fault. The value checks of the timesteps (range, prev_t < t) run on the CPU only; on CUDA the kernels
// assert on the device (as PyTorch's own index kernels), so no op synchronises with the host.
// ------------------------------------------------------------------------------------------------------------------
Prediction parse_prediction(const char* op, c10::string_view prediction_type);
bool parse_fixed_small(const char* op, c10::string_view variance_type);

// x: a float tensor [N, ...] (fp16/bf16/fp32/fp64) on CPU or CUDA; `other` (may be undefined): same shape, dtype and
// device; t: int64 [N] on x's device; each table: 1-D float32/float64 of the same length on x's device.
void check_data(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& other,
                const char* other_name);
void check_timesteps(const char* op, const at::Tensor& t, const char* t_name, const at::Tensor& x,
                     const char* x_name);
void check_table(const char* op, const at::Tensor& table, const char* name, const at::Tensor& x, int64_t length);

// x as a dense tensor whose batch dimension is outermost in memory (contiguous and channels_last inputs are used
// as they are; anything else is copied to contiguous), and `others` copied where their strides differ from it, so
// that every tensor can be walked with one flat index p, element p belonging to sample p / (numel / N).
at::Tensor batch_major(const at::Tensor& x);
at::Tensor strided_like(const at::Tensor& y, const at::Tensor& like);

}  // namespace layoutgen
