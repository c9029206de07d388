// layoutgen noise ops: the operator schemas (TORCH_LIBRARY, schema first as in pytorch/extension-cpp), the argument
// checks shared with the CUDA kernels, and the CPU implementations.
//
// Every op walks its tensors with one flat index in memory order (contiguous and channels_last inputs as they are,
// others copied to contiguous first), in blocks that never cross a sample, so each block has one set of per-sample
// coefficients. The CPU loops are vectorised with at::vec and split over threads with at::parallel_for; fp16 / bf16
// blocks are converted to float in a small buffer, computed in float and converted back (fp32 arithmetic for
// fp16/bf16/fp32, fp64 for fp64: at::opmath_type). The formulas are those of the references in kernels/noise_ops.py.
#include <Python.h>

#include <algorithm>
#include <array>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LAYOUTGEN_F16C 1
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "noise_ops.h"

// `import layoutgen._C` loads this library, whose static initialisers register the ops with the dispatcher; the
// Python module itself is empty (no pybind11, as pytorch/extension-cpp).
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "layoutgen noise ops (torch.ops.layoutgen)", -1, nullptr, nullptr, nullptr, nullptr,
      nullptr};
  return PyModule_Create(&module_def);
}
}

namespace layoutgen {

using at::Tensor;

// at::vec's clamp for vectors (step_mean clips x0 with Clamp<V>).
template <typename T>
struct Clamp<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V apply(const V& x, const V& lo, const V& hi) { return at::vec::clamp(x, lo, hi); }
};

// ----------------------------------------------------------------------------------------------------------------------
// Argument checks (declared in noise_ops.h, used by the CUDA ops too).
// ----------------------------------------------------------------------------------------------------------------------

Prediction parse_prediction(const char* op, c10::string_view prediction_type) {
  TORCH_CHECK_VALUE(prediction_type == "epsilon" || prediction_type == "v" || prediction_type == "sample", op,
                    ": prediction_type must be one of ['epsilon', 'v', 'sample'], got '", std::string(prediction_type),
                    "'");
  return prediction_type == "epsilon" ? Prediction::kEpsilon
         : prediction_type == "v"     ? Prediction::kV
                                      : Prediction::kSample;
}

bool parse_fixed_small(const char* op, c10::string_view variance_type) {
  TORCH_CHECK_VALUE(variance_type == "fixed_small" || variance_type == "fixed_large", op,
                    ": variance_type must be one of ['fixed_small', 'fixed_large'], got '", std::string(variance_type),
                    "'");
  return variance_type == "fixed_small";
}

static bool is_data_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_data(const char* op, const Tensor& x, const char* x_name, const Tensor& other, const char* other_name) {
  TORCH_CHECK_VALUE(is_data_dtype(x.scalar_type()), op, ": ", x_name,
                    " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", x_name, " must have a batch dimension [N, ...], got a 0-d tensor");
  if (!other.defined()) return;
  TORCH_CHECK_VALUE(other.sizes() == x.sizes(), op, ": ", other_name, " shape ", other.sizes(), " does not match ",
                    x_name, " shape ", x.sizes());
  TORCH_CHECK_VALUE(other.scalar_type() == x.scalar_type(), op, ": ", other_name, " dtype ", other.scalar_type(),
                    " does not match ", x_name, " dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(other.device() == x.device(), op, ": ", other_name, " is on ", other.device(), " but ", x_name,
                    " is on ", x.device());
}

void check_timesteps(const char* op, const Tensor& t, const char* t_name, const Tensor& x, const char* x_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, op, ": ", t_name, " must be an int64 tensor of timesteps, got dtype ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", t_name, " must have shape [N] = [", x.size(0),
                    "] (the batch size of ", x_name, "), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", t_name, " is on ", t.device(), " but ", x_name, " is on ",
                    x.device(), " (timesteps must be on the data's device)");
}

void check_table(const char* op, const Tensor& table, const char* name, const Tensor& x, int64_t length) {
  TORCH_CHECK_VALUE(table.dim() == 1 && table.numel() > 0, op, ": ", name,
                    " must be a non-empty 1-D tensor indexed by timestep, got shape ", table.sizes());
  TORCH_CHECK_VALUE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble, op, ": ", name,
                    " must be float32 or float64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.device() == x.device(), op, ": ", name, " is on ", table.device(), " but the data is on ",
                    x.device());
  TORCH_CHECK_VALUE(length < 0 || table.numel() == length, op, ": ", name, " has ", table.numel(),
                    " entries but the other table has ", length);
}

static bool is_batch_major(const Tensor& x) {
  if (x.numel() == 0 || !x.is_non_overlapping_and_dense()) return false;
  const int64_t n = x.size(0);
  return n == 1 || x.stride(0) == x.numel() / n;
}

Tensor batch_major(const Tensor& x) { return is_batch_major(x) ? x : x.contiguous(); }

Tensor strided_like(const Tensor& y, const Tensor& like) {
  bool same = true;
  for (int64_t d = 0; d < like.dim(); ++d) {
    if (like.size(d) != 1 && y.stride(d) != like.stride(d)) same = false;
  }
  if (same && y.is_non_overlapping_and_dense()) return y;
  Tensor out = at::empty_like(like, y.options());
  out.copy_(y);
  return out;
}

namespace {

// ----------------------------------------------------------------------------------------------------------------------
// CPU driver: blocks of one sample, converted to opmath in a stack buffer unless the dtype is already opmath.
// ----------------------------------------------------------------------------------------------------------------------

constexpr int64_t kBlock = 2048;     // elements per block (the conversion buffers stay in L1)
constexpr int64_t kGrain = 1 << 16;  // elements per parallel task

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Block conversions to and from opmath. at::vec converts fp16 one element at a time unless the whole library is built
// for F16C, so fp16 gets its own F16C loops, picked at run time (this library is built for baseline x86-64).
template <typename src_t, typename dst_t>
void convert_block(const src_t* src, dst_t* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

#ifdef LAYOUTGEN_F16C
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);  // round to nearest even, as F16C
}

const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");

template <>
void convert_block<c10::Half, float>(const c10::Half* src, float* dst, int64_t n) {
  if (kHasF16C) return half_to_float_f16c(src, dst, n);
  at::vec::convert(src, dst, n);
}

template <>
void convert_block<float, c10::Half>(const float* src, c10::Half* dst, int64_t n) {
  if (kHasF16C) return float_to_half_f16c(src, dst, n);
  at::vec::convert(src, dst, n);
}
#endif

template <typename scalar_t>
constexpr bool kDirect = std::is_same_v<scalar_t, opmath_t<scalar_t>>;

// Calls f(n, p, len, in, out) for blocks [p, p + len) of sample n, where in[k] / out[k] point at len opmath values of
// input / output k (the tensors' own memory when scalar_t is opmath, conversion buffers otherwise). An input pointer
// may be null (an absent optional input): it stays null.
template <typename scalar_t, int NIN, int NOUT, typename F>
void for_each_block(const std::array<const scalar_t*, NIN>& in, const std::array<scalar_t*, NOUT>& out, int64_t numel,
                    int64_t inner, const F& f) {
  using acc_t = opmath_t<scalar_t>;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    // Buffers only for the converted dtypes (size 1 otherwise).
    constexpr int64_t kBuf = kDirect<scalar_t> ? 1 : kBlock;
    std::array<std::array<acc_t, kBuf>, NIN> in_buf;
    std::array<std::array<acc_t, kBuf>, NOUT> out_buf;
    for (int64_t p = begin; p < end;) {
      const int64_t n = p / inner;
      const int64_t stop = std::min({end, (n + 1) * inner, p + kBlock});
      const int64_t len = stop - p;
      std::array<const acc_t*, NIN> ip;
      std::array<acc_t*, NOUT> op;
      for (int k = 0; k < NIN; ++k) {
        if (in[k] == nullptr) {
          ip[k] = nullptr;
        } else if constexpr (kDirect<scalar_t>) {
          ip[k] = reinterpret_cast<const acc_t*>(in[k] + p);
        } else {
          convert_block(in[k] + p, in_buf[k].data(), len);
          ip[k] = in_buf[k].data();
        }
      }
      for (int k = 0; k < NOUT; ++k) {
        if constexpr (kDirect<scalar_t>) {
          op[k] = reinterpret_cast<acc_t*>(out[k] + p);
        } else {
          op[k] = out_buf[k].data();
        }
      }
      f(n, p, len, ip, op);
      if constexpr (!kDirect<scalar_t>) {
        for (int k = 0; k < NOUT; ++k) convert_block(out_buf[k].data(), out[k] + p, len);
      }
      p = stop;
    }
  });
}

// out = a * x + b * z over len opmath values (add_noise: x = x0, z = noise; velocity: x = noise, z = x0, b = -b[t]).
template <typename acc_t>
void axpby(const acc_t* x, const acc_t* z, acc_t* out, int64_t len, acc_t a, acc_t b) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec va(a), vb(b);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= len; i += 2 * Vec::size()) {
    const Vec r0 = va * Vec::loadu(x + i) + vb * Vec::loadu(z + i);
    const Vec r1 = va * Vec::loadu(x + i + Vec::size()) + vb * Vec::loadu(z + i + Vec::size());
    r0.store(out + i);
    r1.store(out + i + Vec::size());
  }
  for (; i < len; ++i) out[i] = a * x[i] + b * z[i];
}

// Per-sample values table[t[n]] in double, checking 0 <= t < T (the error names the op, the argument and the value).
template <typename table_t>
std::vector<double> gather_checked(const char* op, const Tensor& t, const char* t_name, const Tensor& table) {
  const Tensor tc = t.contiguous();
  const Tensor tab = table.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const table_t* vp = tab.data_ptr<table_t>();
  const int64_t length = tab.numel();
  std::vector<double> values(tc.numel());
  for (int64_t n = 0; n < tc.numel(); ++n) {
    TORCH_CHECK_VALUE(tp[n] >= 0 && tp[n] < length, op, ": ", t_name, " must be in [0, ", length, "), got ", tp[n],
                      " for sample ", n);
    values[n] = static_cast<double>(vp[tp[n]]);
  }
  return values;
}

std::vector<double> gather_table(const char* op, const Tensor& t, const char* t_name, const Tensor& table) {
  return table.scalar_type() == at::kDouble ? gather_checked<double>(op, t, t_name, table)
                                            : gather_checked<float>(op, t, t_name, table);
}

// ----------------------------------------------------------------------------------------------------------------------
// add_noise and velocity: x_t = a x0 + b noise,  v = a noise - b x0  (a = sqrt(acp[t]), b = sqrt(1 - acp[t])).
// ----------------------------------------------------------------------------------------------------------------------

Tensor noise_mix_cpu(const char* op, bool velocity, const Tensor& x0_in, const Tensor& noise_in, const Tensor& t,
                     const Tensor& sqrt_acp, const Tensor& sqrt_1m_acp) {
  check_data(op, x0_in, "x0", noise_in, "noise");
  check_timesteps(op, t, "t", x0_in, "x0");
  check_table(op, sqrt_acp, "sqrt_alphas_cumprod", x0_in, -1);
  check_table(op, sqrt_1m_acp, "sqrt_one_minus_alphas_cumprod", x0_in, sqrt_acp.numel());
  const std::vector<double> a = gather_table(op, t, "t", sqrt_acp);
  const std::vector<double> b = gather_table(op, t, "t", sqrt_1m_acp);
  const Tensor x0 = batch_major(x0_in);
  const Tensor noise = strided_like(noise_in, x0);
  Tensor out = at::empty_like(x0);
  const int64_t numel = x0.numel();
  if (numel == 0) return out;
  const int64_t inner = numel / x0.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "noise_mix_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    for_each_block<scalar_t, 2, 1>(
        {x0.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>()}, {out.mutable_data_ptr<scalar_t>()}, numel,
        inner, [&](int64_t n, int64_t, int64_t len, const auto& in, const auto& o) {
          const acc_t an = static_cast<acc_t>(a[n]), bn = static_cast<acc_t>(b[n]);
          if (velocity) {
            axpby<acc_t>(in[1], in[0], o[0], len, an, -bn);  // a noise - b x0
          } else {
            axpby<acc_t>(in[0], in[1], o[0], len, an, bn);
          }
        });
  });
  return out;
}

Tensor add_noise_cpu(const Tensor& x0, const Tensor& noise, const Tensor& t, const Tensor& sqrt_acp,
                     const Tensor& sqrt_1m_acp) {
  return noise_mix_cpu("add_noise", false, x0, noise, t, sqrt_acp, sqrt_1m_acp);
}

Tensor velocity_cpu(const Tensor& x0, const Tensor& noise, const Tensor& t, const Tensor& sqrt_acp,
                    const Tensor& sqrt_1m_acp) {
  return noise_mix_cpu("velocity", true, x0, noise, t, sqrt_acp, sqrt_1m_acp);
}

// ----------------------------------------------------------------------------------------------------------------------
// add_noise_philox: noise drawn in the same pass (Philox4x32-10 + Box-Muller, noise_ops.h), x_t = a x0 + b noise.
// The noise is rounded to x0's dtype first, so x_t equals add_noise(x0, noise, ...) with the returned noise.
// ----------------------------------------------------------------------------------------------------------------------

// len standard normals for the memory positions [p, p + len).
void fill_normals(float* dst, int64_t p, int64_t len, uint64_t seed, uint64_t offset) {
  int64_t k = 0;
  while (k < len) {
    float z[4];
    box_muller4(philox4x32_10(static_cast<uint64_t>(p) >> 2, offset, seed), z);
    for (int j = static_cast<int>(p & 3); j < 4 && k < len; ++j, ++k, ++p) dst[k] = z[j];
  }
}

std::tuple<Tensor, Tensor> add_noise_philox_cpu(const Tensor& x0_in, const Tensor& t, const Tensor& sqrt_acp,
                                                const Tensor& sqrt_1m_acp, int64_t seed, int64_t offset) {
  const char* op = "add_noise_philox";
  check_data(op, x0_in, "x0", Tensor(), "");
  check_timesteps(op, t, "t", x0_in, "x0");
  check_table(op, sqrt_acp, "sqrt_alphas_cumprod", x0_in, -1);
  check_table(op, sqrt_1m_acp, "sqrt_one_minus_alphas_cumprod", x0_in, sqrt_acp.numel());
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
  const std::vector<double> a = gather_table(op, t, "t", sqrt_acp);
  const std::vector<double> b = gather_table(op, t, "t", sqrt_1m_acp);
  const Tensor x0 = batch_major(x0_in);
  Tensor out = at::empty_like(x0);
  Tensor noise = at::empty_like(x0);
  const int64_t numel = x0.numel();
  if (numel == 0) return {out, noise};
  const int64_t inner = numel / x0.size(0);
  const uint64_t useed = static_cast<uint64_t>(seed), uoffset = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "add_noise_philox_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    // Output 1 is the noise (in opmath); for_each_block converts it back to scalar_t.
    for_each_block<scalar_t, 1, 2>(
        {x0.const_data_ptr<scalar_t>()}, {out.mutable_data_ptr<scalar_t>(), noise.mutable_data_ptr<scalar_t>()}, numel, inner,
        [&](int64_t n, int64_t p, int64_t len, const auto& in, const auto& o) {
          std::array<float, kBlock> z;
          fill_normals(z.data(), p, len, useed, uoffset);
          // Round to the noise's dtype (a no-op for fp32), then to opmath: x_t uses the noise exactly as returned.
          for (int64_t i = 0; i < len; ++i) o[1][i] = static_cast<acc_t>(static_cast<scalar_t>(z[i]));
          axpby<acc_t>(in[0], o[1], o[0], len, static_cast<acc_t>(a[n]), static_cast<acc_t>(b[n]));
        });
  });
  return {out, noise};
}

// ----------------------------------------------------------------------------------------------------------------------
// ddpm_step and ddim_step: per-sample coefficients in double (noise_ops.h), then one vectorised pass.
// ----------------------------------------------------------------------------------------------------------------------

struct StepArgs {
  Prediction pred;
  bool ddim, clip;
  double clip_range;
};

// acp[t] and acp_prev per sample, checking 0 <= t < T, prev_t < T and prev_t < t; acp_prev = prev_value where
// prev_t < 0. Returns the coefficients in acc_t from make(acp_t, acp_prev, t > 0).
template <typename acc_t, typename table_t, typename Make>
std::vector<StepCoefs<acc_t>> step_coefs_checked(const char* op, const Tensor& t, const Tensor& prev_t,
                                                 const Tensor& acp_table, double prev_value, const Make& make) {
  const Tensor tc = t.contiguous(), pc = prev_t.contiguous(), tab = acp_table.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const table_t* acp = tab.data_ptr<table_t>();
  const int64_t length = tab.numel();
  std::vector<StepCoefs<acc_t>> coefs(tc.numel());
  for (int64_t n = 0; n < tc.numel(); ++n) {
    TORCH_CHECK_VALUE(tp[n] >= 0 && tp[n] < length, op, ": t must be in [0, ", length, "), got ", tp[n],
                      " for sample ", n);
    TORCH_CHECK_VALUE(pp[n] < tp[n], op, ": prev_t must be < t for every sample (a negative prev_t ends at the data), "
                      "got prev_t=", pp[n], " for t=", tp[n], " (sample ", n, ")");
    const double acp_t = static_cast<double>(acp[tp[n]]);
    const double acp_prev = pp[n] >= 0 ? static_cast<double>(acp[pp[n]]) : prev_value;
    coefs[n] = make(acp_t, acp_prev, tp[n] > 0);
  }
  return coefs;
}

template <typename scalar_t>
void step_cpu_kernel(const Tensor& m, const Tensor& x, const Tensor& z, const Tensor& x_prev, const Tensor& x0_out,
                     const std::vector<StepCoefs<opmath_t<scalar_t>>>& coefs, const StepArgs& args) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t numel = x.numel();
  const int64_t inner = numel / x.size(0);
  const scalar_t* zp = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
  const acc_t lo = static_cast<acc_t>(-args.clip_range), hi = static_cast<acc_t>(args.clip_range);
  for_each_block<scalar_t, 3, 2>(
      {m.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), zp},
      {x_prev.mutable_data_ptr<scalar_t>(), x0_out.mutable_data_ptr<scalar_t>()}, numel, inner,
      [&](int64_t n, int64_t, int64_t len, const auto& in, const auto& o) {
        const StepCoefs<acc_t>& c = coefs[n];
        const acc_t* mp = in[0];
        const acc_t* xp = in[1];
        const acc_t* np = in[2];
        acc_t* outp = o[0];
        acc_t* x0p = o[1];
        const bool noisy = np != nullptr;
        const Vec vsa(c.sa), vs1m(c.s1m), vc0(c.c0), vc1(c.c1), vcz(c.cz), vlo(lo), vhi(hi);
        int64_t i = 0;
        for (; i + Vec::size() <= len; i += Vec::size()) {
          Vec x0;
          Vec mean = step_mean<Vec>(Vec::loadu(mp + i), Vec::loadu(xp + i), vsa, vs1m, vc0, vc1, args.pred, args.ddim,
                                    args.clip, vlo, vhi, &x0);
          if (noisy) mean = mean + vcz * Vec::loadu(np + i);
          mean.store(outp + i);
          x0.store(x0p + i);
        }
        for (; i < len; ++i) {
          acc_t x0;
          acc_t mean = step_mean<acc_t>(mp[i], xp[i], c.sa, c.s1m, c.c0, c.c1, args.pred, args.ddim, args.clip, lo, hi,
                                        &x0);
          if (noisy) mean = mean + c.cz * np[i];
          outp[i] = mean;
          x0p[i] = x0;
        }
      });
}

// Shared by both steps: checks, layouts, outputs; `make` builds one sample's coefficients.
template <typename MakeFactory>
std::tuple<Tensor, Tensor> step_cpu(const char* op, const Tensor& model_output, const Tensor& x_t_in, const Tensor& t,
                                    const Tensor& prev_t, const Tensor& alphas_cumprod,
                                    const std::optional<Tensor>& variance_noise, double prev_value,
                                    const StepArgs& args, bool use_noise, const MakeFactory& factory) {
  check_data(op, x_t_in, "x_t", model_output, "model_output");
  if (variance_noise.has_value()) check_data(op, x_t_in, "x_t", *variance_noise, "variance_noise");
  check_timesteps(op, t, "t", x_t_in, "x_t");
  check_timesteps(op, prev_t, "prev_t", x_t_in, "x_t");
  check_table(op, alphas_cumprod, "alphas_cumprod", x_t_in, -1);
  TORCH_CHECK_VALUE(!args.clip || args.clip_range >= 0, op, ": clip_range must be >= 0, got ", args.clip_range);
  const Tensor x = batch_major(x_t_in);
  const Tensor m = strided_like(model_output, x);
  const Tensor z = (use_noise && variance_noise.has_value()) ? strided_like(*variance_noise, x) : Tensor();
  Tensor x_prev = at::empty_like(x);
  Tensor x0 = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "step_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto make = factory.template get<acc_t>();
    const auto coefs = alphas_cumprod.scalar_type() == at::kDouble
                           ? step_coefs_checked<acc_t, double>(op, t, prev_t, alphas_cumprod, prev_value, make)
                           : step_coefs_checked<acc_t, float>(op, t, prev_t, alphas_cumprod, prev_value, make);
    if (x.numel() > 0) step_cpu_kernel<scalar_t>(m, x, z, x_prev, x0, coefs, args);
  });
  return {x_prev, x0};
}

struct DdpmFactory {
  bool fixed_small;
  template <typename acc_t>
  auto get() const {
    return [fs = fixed_small](double acp_t, double acp_prev, bool t_positive) {
      return ddpm_coefs<acc_t>(acp_t, acp_prev, t_positive, fs);
    };
  }
};

struct DdimFactory {
  double eta;
  template <typename acc_t>
  auto get() const {
    return [e = eta](double acp_t, double acp_prev, bool) { return ddim_coefs<acc_t>(acp_t, acp_prev, e); };
  }
};

std::tuple<Tensor, Tensor> ddpm_step_cpu(const Tensor& model_output, const Tensor& x_t, const Tensor& t,
                                         const Tensor& prev_t, const Tensor& alphas_cumprod,
                                         c10::string_view prediction_type, c10::string_view variance_type,
                                         bool clip_sample, double clip_range,
                                         const std::optional<Tensor>& variance_noise) {
  const char* op = "ddpm_step";
  const StepArgs args{parse_prediction(op, prediction_type), false, clip_sample, clip_range};
  const DdpmFactory factory{parse_fixed_small(op, variance_type)};
  return step_cpu(op, model_output, x_t, t, prev_t, alphas_cumprod, variance_noise, 1.0, args, true, factory);
}

std::tuple<Tensor, Tensor> ddim_step_cpu(const Tensor& model_output, const Tensor& x_t, const Tensor& t,
                                         const Tensor& prev_t, const Tensor& alphas_cumprod, double eta,
                                         c10::string_view prediction_type, bool clip_sample, double clip_range,
                                         const std::optional<Tensor>& variance_noise, double final_alpha_cumprod) {
  const char* op = "ddim_step";
  TORCH_CHECK_VALUE(eta >= 0.0 && eta <= 1.0, op, ": eta must be in [0.0, 1.0], got ", eta);
  TORCH_CHECK_VALUE(final_alpha_cumprod >= 0.0 && final_alpha_cumprod <= 1.0, op,
                    ": final_alpha_cumprod must be in [0.0, 1.0], got ", final_alpha_cumprod);
  const StepArgs args{parse_prediction(op, prediction_type), true, clip_sample, clip_range};
  return step_cpu(op, model_output, x_t, t, prev_t, alphas_cumprod, variance_noise, final_alpha_cumprod, args,
                  eta > 0, DdimFactory{eta});
}

}  // namespace

// ----------------------------------------------------------------------------------------------------------------------
// Schemas. The Python front (kernels/noise_ops.py) registers the fake (meta) functions and the autograd formulas;
// set_python_module tells torch to import it when those are needed before the user did.
// ----------------------------------------------------------------------------------------------------------------------

TORCH_LIBRARY(layoutgen, m) {
  m.set_python_module("layoutgen.kernels.noise_ops");
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("add_noise(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_alphas_cumprod, "
        "Tensor sqrt_one_minus_alphas_cumprod) -> Tensor", tags);
  m.def("velocity(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_alphas_cumprod, "
        "Tensor sqrt_one_minus_alphas_cumprod) -> Tensor", tags);
  m.def("add_noise_philox(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, "
        "SymInt seed, SymInt offset) -> (Tensor, Tensor)", tags);
  m.def("ddpm_step(Tensor model_output, Tensor x_t, Tensor t, Tensor prev_t, Tensor alphas_cumprod, "
        "str prediction_type, str variance_type, bool clip_sample, float clip_range, Tensor? variance_noise) "
        "-> (Tensor, Tensor)", tags);
  m.def("ddim_step(Tensor model_output, Tensor x_t, Tensor t, Tensor prev_t, Tensor alphas_cumprod, float eta, "
        "str prediction_type, bool clip_sample, float clip_range, Tensor? variance_noise, "
        "float final_alpha_cumprod) -> (Tensor, Tensor)", tags);
}

TORCH_LIBRARY_IMPL(layoutgen, CPU, m) {
  m.impl("add_noise", &add_noise_cpu);
  m.impl("velocity", &velocity_cpu);
  m.impl("add_noise_philox", &add_noise_philox_cpu);
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace layoutgen
