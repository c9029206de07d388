// CUDA implementations of the layoutgen noise ops (schemas and checks in ../noise_ops.cpp, shared math in
// ../noise_ops.h).
//
// Launch layout: a 2-D grid, blockIdx.y = the sample (grid-stride over samples past 65535), blockIdx.x and the
// threads grid-stride over that sample's elements, so each thread gathers its sample's coefficients once and the
// element loop has no division. Where every sample starts on a 16-byte boundary (inner size a multiple of the vector
// width, aligned pointers) each thread moves 16 bytes per load and store; otherwise one element at a time. All
// arithmetic in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64). Launched on the current stream.
// Timesteps are checked on the device (CUDA_KERNEL_ASSERT, as PyTorch's index kernels): no op waits for the host.
#include <algorithm>
#include <array>
#include <mutex>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../noise_ops.h"

namespace layoutgen {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The elements per 16-byte load of scalar_t.
template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

int multiprocessor_count(int device) {
  static std::array<int, 64> cache{};
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 0 || device >= static_cast<int>(cache.size())) return 108;
  if (cache[device] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device] = std::max(count, 1);
  }
  return cache[device];
}

// y: one block row per sample (at most 65535, the kernels loop over the rest); x: enough blocks for ~4 waves of
// full occupancy over the whole grid, at most one per kThreads units of work in a sample.
dim3 make_grid(int64_t samples, int64_t units_per_sample, int device) {
  const int64_t rows = std::min<int64_t>(samples, 65535);
  const int64_t target = static_cast<int64_t>(multiprocessor_count(device)) * (2048 / kThreads) * 4;
  const int64_t needed = (units_per_sample + kThreads - 1) / kThreads;
  const int64_t cols = std::max<int64_t>(1, std::min<int64_t>(needed, (target + rows - 1) / rows));
  return dim3(static_cast<unsigned>(cols), static_cast<unsigned>(rows));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// table[t] in double for a float32 or float64 table (the references gather in float64).
__device__ __forceinline__ double table_value(const void* table, bool is_double, int64_t t) {
  return is_double ? static_cast<const double*>(table)[t] : static_cast<double>(static_cast<const float*>(table)[t]);
}

// ----------------------------------------------------------------------------------------------------------------------
// add_noise / velocity: out = ca * u + cb * w (add_noise: u = x0, w = noise; velocity: u = noise, w = x0, cb = -b).
// ----------------------------------------------------------------------------------------------------------------------

template <typename scalar_t, int VEC>
__global__ void noise_mix_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ noise,
                                 scalar_t* __restrict__ out, const int64_t* __restrict__ t, const void* table_a,
                                 const void* table_b, bool tables_double, int64_t table_len, int64_t samples,
                                 int64_t inner, bool velocity) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t units = inner / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = blockIdx.y; n < samples; n += gridDim.y) {
    const int64_t ts = t[n];
    CUDA_KERNEL_ASSERT(ts >= 0 && ts < table_len);  // "t must be in [0, T)"
    const acc_t a = static_cast<acc_t>(table_value(table_a, tables_double, ts));
    const acc_t b = static_cast<acc_t>(table_value(table_b, tables_double, ts));
    const acc_t ca = a, cb = velocity ? -b : b;
    const P* u = reinterpret_cast<const P*>((velocity ? noise : x0) + n * inner);
    const P* w = reinterpret_cast<const P*>((velocity ? x0 : noise) + n * inner);
    P* o = reinterpret_cast<P*>(out + n * inner);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < units; i += stride) {
      const P pu = u[i], pw = w[i];
      P r;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        r.v[k] = static_cast<scalar_t>(ca * static_cast<acc_t>(pu.v[k]) + cb * static_cast<acc_t>(pw.v[k]));
      }
      o[i] = r;
    }
  }
}

Tensor noise_mix_cuda(const char* op, bool velocity, const Tensor& x0_in, const Tensor& noise_in, const Tensor& t,
                      const Tensor& sqrt_acp, const Tensor& sqrt_1m_acp) {
  check_data(op, x0_in, "x0", noise_in, "noise");
  check_timesteps(op, t, "t", x0_in, "x0");
  check_table(op, sqrt_acp, "sqrt_alphas_cumprod", x0_in, -1);
  check_table(op, sqrt_1m_acp, "sqrt_one_minus_alphas_cumprod", x0_in, sqrt_acp.numel());
  TORCH_CHECK_VALUE(sqrt_acp.scalar_type() == sqrt_1m_acp.scalar_type(), op,
                    ": sqrt_one_minus_alphas_cumprod dtype ", sqrt_1m_acp.scalar_type(),
                    " does not match sqrt_alphas_cumprod dtype ", sqrt_acp.scalar_type());
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const Tensor x0 = batch_major(x0_in);
  const Tensor noise = strided_like(noise_in, x0);
  const Tensor tc = t.contiguous(), ta = sqrt_acp.contiguous(), tb = sqrt_1m_acp.contiguous();
  Tensor out = at::empty_like(x0);
  const int64_t numel = x0.numel();
  if (numel == 0) return out;
  const int64_t samples = x0.size(0), inner = numel / samples;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x0.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "noise_mix_cuda", [&] {
    constexpr int V = kVec<scalar_t>;
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* zp = noise.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const bool vec = inner % V == 0 && aligned16(xp) && aligned16(zp) && aligned16(op_);
    const bool dbl = ta.scalar_type() == at::kDouble;
    if (vec) {
      noise_mix_kernel<scalar_t, V><<<make_grid(samples, inner / V, device), kThreads, 0, stream>>>(
          xp, zp, op_, tc.const_data_ptr<int64_t>(), ta.const_data_ptr(), tb.const_data_ptr(), dbl, ta.numel(),
          samples, inner, velocity);
    } else {
      noise_mix_kernel<scalar_t, 1><<<make_grid(samples, inner, device), kThreads, 0, stream>>>(
          xp, zp, op_, tc.const_data_ptr<int64_t>(), ta.const_data_ptr(), tb.const_data_ptr(), dbl, ta.numel(),
          samples, inner, velocity);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor add_noise_cuda(const Tensor& x0, const Tensor& noise, const Tensor& t, const Tensor& sqrt_acp,
                      const Tensor& sqrt_1m_acp) {
  return noise_mix_cuda("add_noise", false, x0, noise, t, sqrt_acp, sqrt_1m_acp);
}

Tensor velocity_cuda(const Tensor& x0, const Tensor& noise, const Tensor& t, const Tensor& sqrt_acp,
                     const Tensor& sqrt_1m_acp) {
  return noise_mix_cuda("velocity", true, x0, noise, t, sqrt_acp, sqrt_1m_acp);
}

// ----------------------------------------------------------------------------------------------------------------------
// add_noise_philox: each thread takes Philox blocks (4 normals for the memory positions 4g .. 4g+3) of its sample;
// a block that straddles two samples is drawn by both, each writing its own elements (the stream depends on the
// position only). The noise is rounded to scalar_t before x_t = a x0 + b noise, as on the CPU.
// ----------------------------------------------------------------------------------------------------------------------

template <typename scalar_t, bool VEC4>
__global__ void add_noise_philox_kernel(const scalar_t* __restrict__ x0, scalar_t* __restrict__ out,
                                        scalar_t* __restrict__ noise, const int64_t* __restrict__ t,
                                        const void* table_a, const void* table_b, bool tables_double,
                                        int64_t table_len, int64_t samples, int64_t inner, uint64_t seed,
                                        uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, 4>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = blockIdx.y; n < samples; n += gridDim.y) {
    const int64_t ts = t[n];
    CUDA_KERNEL_ASSERT(ts >= 0 && ts < table_len);
    const acc_t a = static_cast<acc_t>(table_value(table_a, tables_double, ts));
    const acc_t b = static_cast<acc_t>(table_value(table_b, tables_double, ts));
    const int64_t begin = n * inner, end = begin + inner;
    const int64_t first_block = begin >> 2, blocks = ((end + 3) >> 2) - first_block;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < blocks; i += stride) {
      const int64_t g = first_block + i;
      float z[4];
      box_muller4(philox4x32_10(static_cast<uint64_t>(g), offset, seed), z);
      if (VEC4) {  // inner % 4 == 0 and aligned: the block lies inside the sample
        const P px = reinterpret_cast<const P*>(x0)[g];
        P pn, po;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          pn.v[k] = static_cast<scalar_t>(z[k]);
          po.v[k] = static_cast<scalar_t>(a * static_cast<acc_t>(px.v[k]) + b * static_cast<acc_t>(pn.v[k]));
        }
        reinterpret_cast<P*>(noise)[g] = pn;
        reinterpret_cast<P*>(out)[g] = po;
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t p = 4 * g + k;
          if (p >= begin && p < end) {
            const scalar_t nz = static_cast<scalar_t>(z[k]);
            noise[p] = nz;
            out[p] = static_cast<scalar_t>(a * static_cast<acc_t>(x0[p]) + b * static_cast<acc_t>(nz));
          }
        }
      }
    }
  }
}

std::tuple<Tensor, Tensor> add_noise_philox_cuda(const Tensor& x0_in, const Tensor& t, const Tensor& sqrt_acp,
                                                 const Tensor& sqrt_1m_acp, int64_t seed, int64_t offset) {
  const char* op = "add_noise_philox";
  check_data(op, x0_in, "x0", Tensor(), "");
  check_timesteps(op, t, "t", x0_in, "x0");
  check_table(op, sqrt_acp, "sqrt_alphas_cumprod", x0_in, -1);
  check_table(op, sqrt_1m_acp, "sqrt_one_minus_alphas_cumprod", x0_in, sqrt_acp.numel());
  TORCH_CHECK_VALUE(sqrt_acp.scalar_type() == sqrt_1m_acp.scalar_type(), op,
                    ": sqrt_one_minus_alphas_cumprod dtype ", sqrt_1m_acp.scalar_type(),
                    " does not match sqrt_alphas_cumprod dtype ", sqrt_acp.scalar_type());
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const Tensor x0 = batch_major(x0_in);
  const Tensor tc = t.contiguous(), ta = sqrt_acp.contiguous(), tb = sqrt_1m_acp.contiguous();
  Tensor out = at::empty_like(x0);
  Tensor noise = at::empty_like(x0);
  const int64_t numel = x0.numel();
  if (numel == 0) return {out, noise};
  const int64_t samples = x0.size(0), inner = numel / samples;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = make_grid(samples, (inner + 3) / 4 + 1, x0.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "add_noise_philox_cuda", [&] {
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    scalar_t* np_ = noise.mutable_data_ptr<scalar_t>();
    constexpr size_t kAlign = 4 * sizeof(scalar_t);
    const bool vec = inner % 4 == 0 && reinterpret_cast<uintptr_t>(xp) % kAlign == 0 &&
                     reinterpret_cast<uintptr_t>(op_) % kAlign == 0 && reinterpret_cast<uintptr_t>(np_) % kAlign == 0;
    const bool dbl = ta.scalar_type() == at::kDouble;
    if (vec) {
      add_noise_philox_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          xp, op_, np_, tc.const_data_ptr<int64_t>(), ta.const_data_ptr(), tb.const_data_ptr(), dbl, ta.numel(),
          samples, inner, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    } else {
      add_noise_philox_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          xp, op_, np_, tc.const_data_ptr<int64_t>(), ta.const_data_ptr(), tb.const_data_ptr(), dbl, ta.numel(),
          samples, inner, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, noise};
}

// ----------------------------------------------------------------------------------------------------------------------
// ddpm_step / ddim_step: each thread computes its sample's coefficients in double (noise_ops.h), then one pass.
// ----------------------------------------------------------------------------------------------------------------------

struct StepParams {
  Prediction pred;
  bool ddim, clip, fixed_small;
  double clip_range, eta, prev_value;
};

template <typename scalar_t, int VEC>
__global__ void step_kernel(const scalar_t* __restrict__ model_output, const scalar_t* __restrict__ x_t,
                            const scalar_t* __restrict__ variance_noise, scalar_t* __restrict__ x_prev,
                            scalar_t* __restrict__ x0_out, const int64_t* __restrict__ t,
                            const int64_t* __restrict__ prev_t, const void* acp_table, bool table_double,
                            int64_t table_len, int64_t samples, int64_t inner, StepParams params) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t units = inner / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const acc_t lo = static_cast<acc_t>(-params.clip_range), hi = static_cast<acc_t>(params.clip_range);
  const bool noisy = variance_noise != nullptr;
  for (int64_t n = blockIdx.y; n < samples; n += gridDim.y) {
    const int64_t ts = t[n], ps = prev_t[n];
    CUDA_KERNEL_ASSERT(ts >= 0 && ts < table_len);  // "t must be in [0, T)"
    CUDA_KERNEL_ASSERT(ps < ts);                     // "prev_t must be < t"
    const double acp_t = table_value(acp_table, table_double, ts);
    const double acp_prev = ps >= 0 ? table_value(acp_table, table_double, ps) : params.prev_value;
    const StepCoefs<acc_t> c = params.ddim ? ddim_coefs<acc_t>(acp_t, acp_prev, params.eta)
                                           : ddpm_coefs<acc_t>(acp_t, acp_prev, ts > 0, params.fixed_small);
    const P* m = reinterpret_cast<const P*>(model_output + n * inner);
    const P* x = reinterpret_cast<const P*>(x_t + n * inner);
    const P* z = reinterpret_cast<const P*>(noisy ? variance_noise + n * inner : nullptr);
    P* o = reinterpret_cast<P*>(x_prev + n * inner);
    P* o0 = reinterpret_cast<P*>(x0_out + n * inner);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < units; i += stride) {
      const P pm = m[i], px = x[i];
      P pz;
      if (noisy) pz = z[i];
      P r, r0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t x0;
        acc_t mean = step_mean<acc_t>(static_cast<acc_t>(pm.v[k]), static_cast<acc_t>(px.v[k]), c.sa, c.s1m, c.c0,
                                      c.c1, params.pred, params.ddim, params.clip, lo, hi, &x0);
        if (noisy) mean = mean + c.cz * static_cast<acc_t>(pz.v[k]);
        r.v[k] = static_cast<scalar_t>(mean);
        r0.v[k] = static_cast<scalar_t>(x0);
      }
      o[i] = r;
      o0[i] = r0;
    }
  }
}

std::tuple<Tensor, Tensor> step_cuda(const char* op, const Tensor& model_output, const Tensor& x_t_in,
                                     const Tensor& t, const Tensor& prev_t, const Tensor& alphas_cumprod,
                                     const std::optional<Tensor>& variance_noise, bool use_noise,
                                     const StepParams& params) {
  check_data(op, x_t_in, "x_t", model_output, "model_output");
  if (variance_noise.has_value()) check_data(op, x_t_in, "x_t", *variance_noise, "variance_noise");
  check_timesteps(op, t, "t", x_t_in, "x_t");
  check_timesteps(op, prev_t, "prev_t", x_t_in, "x_t");
  check_table(op, alphas_cumprod, "alphas_cumprod", x_t_in, -1);
  TORCH_CHECK_VALUE(!params.clip || params.clip_range >= 0, op, ": clip_range must be >= 0, got ", params.clip_range);
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  const Tensor x = batch_major(x_t_in);
  const Tensor m = strided_like(model_output, x);
  const Tensor z = (use_noise && variance_noise.has_value()) ? strided_like(*variance_noise, x) : Tensor();
  const Tensor tc = t.contiguous(), pc = prev_t.contiguous(), acp = alphas_cumprod.contiguous();
  Tensor x_prev = at::empty_like(x);
  Tensor x0 = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return {x_prev, x0};
  const int64_t samples = x.size(0), inner = numel / samples;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "step_cuda", [&] {
    constexpr int V = kVec<scalar_t>;
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = x_prev.mutable_data_ptr<scalar_t>();
    scalar_t* o0 = x0.mutable_data_ptr<scalar_t>();
    const bool vec = inner % V == 0 && aligned16(mp) && aligned16(xp) && (zp == nullptr || aligned16(zp)) &&
                     aligned16(op_) && aligned16(o0);
    const bool dbl = acp.scalar_type() == at::kDouble;
    if (vec) {
      step_kernel<scalar_t, V><<<make_grid(samples, inner / V, device), kThreads, 0, stream>>>(
          mp, xp, zp, op_, o0, tc.const_data_ptr<int64_t>(), pc.const_data_ptr<int64_t>(), acp.const_data_ptr(), dbl,
          acp.numel(), samples, inner, params);
    } else {
      step_kernel<scalar_t, 1><<<make_grid(samples, inner, device), kThreads, 0, stream>>>(
          mp, xp, zp, op_, o0, tc.const_data_ptr<int64_t>(), pc.const_data_ptr<int64_t>(), acp.const_data_ptr(), dbl,
          acp.numel(), samples, inner, params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_prev, x0};
}

std::tuple<Tensor, Tensor> ddpm_step_cuda(const Tensor& model_output, const Tensor& x_t, const Tensor& t,
                                          const Tensor& prev_t, const Tensor& alphas_cumprod,
                                          c10::string_view prediction_type, c10::string_view variance_type,
                                          bool clip_sample, double clip_range,
                                          const std::optional<Tensor>& variance_noise) {
  const char* op = "ddpm_step";
  StepParams params{parse_prediction(op, prediction_type), false, clip_sample, parse_fixed_small(op, variance_type),
                    clip_range, 0.0, 1.0};
  return step_cuda(op, model_output, x_t, t, prev_t, alphas_cumprod, variance_noise, true, params);
}

std::tuple<Tensor, Tensor> ddim_step_cuda(const Tensor& model_output, const Tensor& x_t, const Tensor& t,
                                          const Tensor& prev_t, const Tensor& alphas_cumprod, double eta,
                                          c10::string_view prediction_type, bool clip_sample, double clip_range,
                                          const std::optional<Tensor>& variance_noise, double final_alpha_cumprod) {
  const char* op = "ddim_step";
  TORCH_CHECK_VALUE(eta >= 0.0 && eta <= 1.0, op, ": eta must be in [0.0, 1.0], got ", eta);
  TORCH_CHECK_VALUE(final_alpha_cumprod >= 0.0 && final_alpha_cumprod <= 1.0, op,
                    ": final_alpha_cumprod must be in [0.0, 1.0], got ", final_alpha_cumprod);
  StepParams params{parse_prediction(op, prediction_type), true, clip_sample, false, clip_range, eta,
                    final_alpha_cumprod};
  return step_cuda(op, model_output, x_t, t, prev_t, alphas_cumprod, variance_noise, eta > 0, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(layoutgen, CUDA, m) {
  m.impl("add_noise", &add_noise_cuda);
  m.impl("velocity", &velocity_cuda);
  m.impl("add_noise_philox", &add_noise_philox_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
}

}  // namespace layoutgen
