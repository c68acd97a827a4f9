// Thin torch binding of the CUDA kernels in csrc/cuda/*.cu (which take raw pointers, int64 strides and a
// stream and know nothing about torch). This file checks arguments, allocates outputs, calls the
// extern "C" launchers on the current CUDA stream and registers the ops as torch.ops.pyattn_cuda.*.
// Compiled only when torch has CUDA (pyattn/_build.py::load_cuda_extension).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

// ---- launchers (defined in csrc/cuda/*.cu); dtype codes: 0 fp32, 1 fp16, 2 bf16 ----
extern "C" {
int64_t pyattn_cuda_rms_norm_bwd_num_chunks(int64_t M);
cudaError_t pyattn_cuda_rms_norm_fwd(int dtype, const void* x, int64_t sx, const void* residual, int64_t sr,
                                     const float* w, void* y, void* h, float* rstd, int64_t M, int64_t N, float eps,
                                     cudaStream_t stream);
cudaError_t pyattn_cuda_rms_norm_bwd(int dtype, const void* dy, int64_t sdy, const void* x, int64_t sx,
                                     const float* w, const float* rstd, const void* dh, int64_t sdh, void* dx,
                                     float* dw, float* dw_part, int64_t M, int64_t N, cudaStream_t stream);
cudaError_t pyattn_cuda_glu_fwd(int dtype, int activation, const void* gate, int64_t sg, const void* up, int64_t su,
                                void* out, int64_t rows, int64_t I, cudaStream_t stream);
cudaError_t pyattn_cuda_glu_bwd(int dtype, int activation, const void* dout, int64_t sd, const void* gate, int64_t sg,
                                const void* up, int64_t su, void* dgate, void* dup, int64_t rows, int64_t I,
                                cudaStream_t stream);
cudaError_t pyattn_cuda_attention_fwd(int dtype, const void* q, const int64_t* q_st, const void* k,
                                      const int64_t* k_st, const void* v, const int64_t* v_st, const void* bias,
                                      int bias_dtype, const int64_t* bias_st, const float* alibi,
                                      const int64_t* alibi_st, const uint8_t* kpm, const int64_t* kpm_st,
                                      const int32_t* cu_q, const int32_t* cu_k, int64_t num_seqs, int64_t B, int64_t H,
                                      int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, float scale, int64_t window_left, int64_t window_right,
                                      int bottom_right, float dropout_p, int64_t dropout_threshold, int64_t seed,
                                      void* out, float* lse, cudaStream_t stream);
cudaError_t pyattn_cuda_attention_bwd(int dtype, const void* dout, const int64_t* do_st, const void* q,
                                      const int64_t* q_st, const void* k, const int64_t* k_st, const void* v,
                                      const int64_t* v_st, const void* out, const int64_t* o_st, const float* lse,
                                      const void* bias, int bias_dtype, const int64_t* bias_st, const float* alibi,
                                      const int64_t* alibi_st, const uint8_t* kpm, const int64_t* kpm_st,
                                      const int32_t* cu_q, const int32_t* cu_k, int64_t num_seqs, int64_t B, int64_t H,
                                      int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, float scale, int64_t window_left, int64_t window_right,
                                      int bottom_right, float dropout_p, int64_t dropout_threshold, int64_t seed,
                                      float* delta_ws, void* dq, void* dk, void* dv, float* dbias,
                                      cudaStream_t stream);
}

namespace pyattn_cuda {
namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "pyattn_cuda: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "pyattn_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "pyattn_cuda: ", name, " is on ", t.device(), ", expected ", ref.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pyattn_cuda: ", op, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ------------------------------------------------------------------ RMSNorm
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK(x.is_cuda(), "rms_norm_fwd: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && (x.stride(1) == 1 || x.size(1) <= 1), "rms_norm_fwd: x must be 2-D with unit column stride");
  const int dt = dtype_code(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  auto y = at::empty({M, N}, x.options());
  auto rstd = at::empty({M}, x.options().dtype(at::kFloat));
  const bool has_res = residual.has_value() && residual->defined();
  auto h = has_res ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  if (has_res) {
    check_cuda(*residual, x, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    (residual->stride(1) == 1 || N <= 1),
                "rms_norm_fwd: residual must match x (shape, dtype) with unit column stride");
  }
  at::Tensor w;
  if (weight.has_value() && weight->defined()) {
    check_cuda(*weight, x, "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == N, "rms_norm_fwd: weight must have shape (", N, ",)");
    TORCH_CHECK(weight->scalar_type() == x.scalar_type() || weight->scalar_type() == at::kFloat,
                "rms_norm_fwd: weight dtype must be x's dtype or float32");
    w = weight->to(at::kFloat).contiguous();
  }
  if (M == 0) return {y, h, rstd};
  if (N == 0) return {y, h, rstd.fill_(1.0 / std::sqrt(eps))};
  check_launch(pyattn_cuda_rms_norm_fwd(dt, x.data_ptr(), x.stride(0), has_res ? residual->data_ptr() : nullptr,
                                        has_res ? residual->stride(0) : 0, w.defined() ? w.data_ptr<float>() : nullptr,
                                        y.data_ptr(), has_res ? h.data_ptr() : nullptr, rstd.data_ptr<float>(), M, N,
                                        static_cast<float>(eps), stream()),
               "rms_norm_fwd");
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const at::Tensor& xin,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd_in,
                                                const std::optional<at::Tensor>& dh_in) {
  TORCH_CHECK(xin.is_cuda(), "rms_norm_bwd: xin must be a CUDA tensor");
  TORCH_CHECK(xin.dim() == 2, "rms_norm_bwd: xin must be 2-D");
  const int dt = dtype_code(xin, "xin");
  c10::cuda::CUDAGuard guard(xin.device());
  const int64_t M = xin.size(0), N = xin.size(1);
  check_cuda(dy_in, xin, "dy");
  check_cuda(rstd_in, xin, "rstd");
  TORCH_CHECK(dy_in.sizes() == xin.sizes() && dy_in.scalar_type() == xin.scalar_type(), "rms_norm_bwd: dy must match xin");
  TORCH_CHECK(rstd_in.numel() == M && rstd_in.scalar_type() == at::kFloat, "rms_norm_bwd: rstd must be float32 (M,)");
  auto x = xin.stride(1) == 1 || N <= 1 ? xin : xin.contiguous();
  auto dy = dy_in.stride(1) == 1 || N <= 1 ? dy_in : dy_in.contiguous();
  auto rstd = rstd_in.contiguous();
  const bool has_dh = dh_in.has_value() && dh_in->defined();
  at::Tensor dh;
  if (has_dh) {
    check_cuda(*dh_in, xin, "dh");
    TORCH_CHECK(dh_in->sizes() == xin.sizes() && dh_in->scalar_type() == xin.scalar_type(), "rms_norm_bwd: dh must match xin");
    dh = dh_in->stride(1) == 1 || N <= 1 ? *dh_in : dh_in->contiguous();
  }
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor w;
  if (has_w) {
    check_cuda(*weight, xin, "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == N, "rms_norm_bwd: weight must have shape (", N, ",)");
    w = weight->to(at::kFloat).contiguous();
  }
  auto dx = at::empty({M, N}, xin.options());
  auto fopt = xin.options().dtype(at::kFloat);
  at::Tensor dw = has_w ? at::empty({N}, fopt) : at::empty({0}, fopt);
  if (N == 0) return {dx, dw};
  if (M == 0) {
    if (has_w) dw.zero_();
    return {dx, dw};
  }
  at::Tensor part = has_w ? at::empty({pyattn_cuda_rms_norm_bwd_num_chunks(M), N}, fopt) : at::empty({0}, fopt);
  check_launch(pyattn_cuda_rms_norm_bwd(dt, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0),
                                        has_w ? w.data_ptr<float>() : nullptr, rstd.data_ptr<float>(),
                                        has_dh ? dh.data_ptr() : nullptr, has_dh ? dh.stride(0) : 0, dx.data_ptr(),
                                        has_w ? dw.data_ptr<float>() : nullptr, has_w ? part.data_ptr<float>() : nullptr,
                                        M, N, stream()),
               "rms_norm_bwd");
  return {dx, dw};
}

// ------------------------------------------------------------------ GLU
void check_glu_pair(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  TORCH_CHECK(gate.is_cuda(), op, ": gate must be a CUDA tensor");
  check_cuda(up, gate, "up");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes(), op, ": gate/up must be 2-D of the same shape, got ",
              gate.sizes(), " and ", up.sizes());
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), op, ": gate/up dtypes differ");
}

at::Tensor unit_col(const at::Tensor& t) { return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous(); }

at::Tensor glu_fwd(const at::Tensor& gate_in, const at::Tensor& up_in, int64_t activation) {
  check_glu_pair(gate_in, up_in, "glu_fwd");
  TORCH_CHECK(activation >= 0 && activation <= 4, "glu_fwd: activation must be 0..4, got ", activation);
  const int dt = dtype_code(gate_in, "gate");
  c10::cuda::CUDAGuard guard(gate_in.device());
  auto gate = unit_col(gate_in), up = unit_col(up_in);
  const int64_t T = gate.size(0), I = gate.size(1);
  auto out = at::empty({T, I}, gate.options());
  if (T == 0 || I == 0) return out;
  check_launch(pyattn_cuda_glu_fwd(dt, (int)activation, gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0),
                                   out.data_ptr(), T, I, stream()),
               "glu_fwd");
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dout_in, const at::Tensor& gate_in, const at::Tensor& up_in,
                                           int64_t activation) {
  check_glu_pair(gate_in, up_in, "glu_bwd");
  check_cuda(dout_in, gate_in, "dout");
  TORCH_CHECK(dout_in.sizes() == gate_in.sizes() && dout_in.scalar_type() == gate_in.scalar_type(),
              "glu_bwd: dout must match gate (shape, dtype)");
  TORCH_CHECK(activation >= 0 && activation <= 4, "glu_bwd: activation must be 0..4, got ", activation);
  const int dt = dtype_code(gate_in, "gate");
  c10::cuda::CUDAGuard guard(gate_in.device());
  auto gate = unit_col(gate_in), up = unit_col(up_in), dout = unit_col(dout_in);
  const int64_t T = gate.size(0), I = gate.size(1);
  auto dgate = at::empty({T, I}, gate.options());
  auto dup = at::empty({T, I}, gate.options());
  if (T == 0 || I == 0) return {dgate, dup};
  check_launch(pyattn_cuda_glu_bwd(dt, (int)activation, dout.data_ptr(), dout.stride(0), gate.data_ptr(),
                                   gate.stride(0), up.data_ptr(), up.stride(0), dgate.data_ptr(), dup.data_ptr(), T, I,
                                   stream()),
               "glu_bwd");
  return {dgate, dup};
}

// ------------------------------------------------------------------ attention
// Everything the launchers need besides the main tensors, gathered once by attn_prepare.
struct AttnExtras {
  at::Tensor bias, alibi, kpm, cu_q, cu_k;  // undefined when absent
  int64_t bias_st[4] = {0, 0, 0, 0};
  int64_t alibi_st[2] = {0, 0};
  int64_t kpm_st[2] = {0, 0};
  int bias_dtype = 0;
  int64_t num_seqs = 0;
  bool varlen = false;
};

// Size-1 dimensions get stride 0 so that broadcasting (and (1, H) alibi slopes in varlen mode) just works.
int64_t bstride(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

at::Tensor last_unit(const at::Tensor& t) { return (t.stride(-1) == 1 || t.size(-1) <= 1) ? t : t.contiguous(); }

AttnExtras attn_prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alibi_slopes,
                        const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
                        const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                        double dropout_p, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  check_cuda(k, q, "k");
  check_cuda(v, q, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, N, D)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Nk, op,
              ": k/v shapes ", k.sizes(), " / ", v.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, op, ": q, k, v must share the head dim");
  TORCH_CHECK(D >= 1 && D <= 256, op, ": head dim must be in 1..256, got ", D);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": H (", H, ") must be a multiple of Hkv (", Hkv, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1)");
  AttnExtras ex;
  const bool has_cq = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const bool has_ck = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
  TORCH_CHECK(has_cq == has_ck, op, ": cu_seqlens_q and cu_seqlens_k must be given together");
  if (has_cq) {
    ex.varlen = true;
    TORCH_CHECK(B == 1, op, ": varlen mode needs B == 1");
    for (const auto* c : {&*cu_seqlens_q, &*cu_seqlens_k}) {
      check_cuda(*c, q, "cu_seqlens");
      TORCH_CHECK(c->dim() == 1 && c->scalar_type() == at::kInt && c->size(0) >= 1, op,
                  ": cu_seqlens must be int32 1-D of length S+1");
    }
    TORCH_CHECK(cu_seqlens_q->size(0) == cu_seqlens_k->size(0), op, ": cu_seqlens_q/k lengths differ");
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen must be >= 0");
    ex.cu_q = cu_seqlens_q->contiguous();
    ex.cu_k = cu_seqlens_k->contiguous();
    ex.num_seqs = ex.cu_q.size(0) - 1;
    TORCH_CHECK(!(bias.has_value() && bias->defined()), op, ": bias is not supported in varlen mode");
    TORCH_CHECK(!(key_padding_mask.has_value() && key_padding_mask->defined()), op,
                ": key_padding_mask is not supported in varlen mode");
  }
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, q, "bias");
    TORCH_CHECK(bias->dim() == 4 && bias->size(0) == B && bias->size(1) == H && bias->size(2) == Nq &&
                    bias->size(3) == Nk,
                op, ": bias must be expanded to (B, H, Nq, Nk) = (", B, ", ", H, ", ", Nq, ", ", Nk, "), got ",
                bias->sizes());
    ex.bias = *bias;
    ex.bias_dtype = dtype_code(ex.bias, "bias");
    for (int d = 0; d < 4; ++d) ex.bias_st[d] = bstride(ex.bias, d);
  }
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    check_cuda(*alibi_slopes, q, "alibi_slopes");
    TORCH_CHECK(alibi_slopes->dim() == 1 || alibi_slopes->dim() == 2, op, ": alibi_slopes must be (H,) or (B, H)");
    ex.alibi = alibi_slopes->to(at::kFloat);
    if (ex.alibi.dim() == 1) ex.alibi = ex.alibi.unsqueeze(0);
    const int64_t ab = ex.alibi.size(0), ah = ex.alibi.size(1);
    // varlen: (1, H) is shared by all sequences, (S, H) is per sequence
    TORCH_CHECK((ab == 1 || ab == (ex.varlen ? ex.num_seqs : B)) && (ah == 1 || ah == H), op,
                ": alibi_slopes shape ", alibi_slopes->sizes(), " does not broadcast to (B, H)");
    ex.alibi_st[0] = bstride(ex.alibi, 0);
    ex.alibi_st[1] = bstride(ex.alibi, 1);
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    check_cuda(*key_padding_mask, q, "key_padding_mask");
    TORCH_CHECK(key_padding_mask->dim() == 2 && (key_padding_mask->size(0) == B || key_padding_mask->size(0) == 1) &&
                    key_padding_mask->size(1) == Nk,
                op, ": key_padding_mask must be (B, Nk) = (", B, ", ", Nk, "), got ", key_padding_mask->sizes());
    ex.kpm = key_padding_mask->scalar_type() == at::kBool ? *key_padding_mask : key_padding_mask->to(at::kBool);
    ex.kpm_st[0] = bstride(ex.kpm, 0);
    ex.kpm_st[1] = bstride(ex.kpm, 1);
  }
  return ex;
}

void strides3(const at::Tensor& t, int64_t* st) {  // (b, h, n) strides of a (B, H, N, D) tensor
  st[0] = t.stride(0);
  st[1] = t.stride(1);
  st[2] = t.stride(2);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    int64_t dropout_threshold, int64_t seed) {
  TORCH_CHECK(q_in.is_cuda(), "attention_fwd: q must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = last_unit(q_in), k = last_unit(k_in), v = last_unit(v_in);
  AttnExtras ex = attn_prepare(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, dropout_p, "attention_fwd");
  const int dt = dtype_code(q, "q");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  auto out = ex.varlen ? at::zeros({B, H, Nq, D}, q.options()) : at::empty({B, H, Nq, D}, q.options());
  auto lse = ex.varlen ? at::full({B, H, Nq}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat))
                       : at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  int64_t qs[3], ks[3], vs[3];
  strides3(q, qs);
  strides3(k, ks);
  strides3(v, vs);
  check_launch(
      pyattn_cuda_attention_fwd(
          dt, q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs, ex.bias.defined() ? ex.bias.data_ptr() : nullptr,
          ex.bias_dtype, ex.bias_st, ex.alibi.defined() ? ex.alibi.data_ptr<float>() : nullptr, ex.alibi_st,
          ex.kpm.defined() ? reinterpret_cast<const uint8_t*>(ex.kpm.data_ptr<bool>()) : nullptr, ex.kpm_st,
          ex.varlen ? ex.cu_q.data_ptr<int32_t>() : nullptr, ex.varlen ? ex.cu_k.data_ptr<int32_t>() : nullptr,
          ex.num_seqs, B, H, Hkv, Nq, Nk, D, max_seqlen_q, max_seqlen_k, static_cast<float>(scale), window_left,
          window_right, bottom_right ? 1 : 0, static_cast<float>(dropout_p), dropout_threshold, seed, out.data_ptr(),
          lse.data_ptr<float>(), stream()),
      "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    int64_t dropout_threshold, int64_t seed, bool bias_requires_grad) {
  TORCH_CHECK(q_in.is_cuda(), "attention_bwd: q must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = last_unit(q_in), k = last_unit(k_in), v = last_unit(v_in);
  AttnExtras ex = attn_prepare(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, dropout_p, "attention_bwd");
  const int dt = dtype_code(q, "q");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  check_cuda(dout_in, q, "dout");
  check_cuda(out_in, q, "out");
  check_cuda(lse_in, q, "lse");
  TORCH_CHECK(dout_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(), "attention_bwd: dout/out must have q's shape");
  TORCH_CHECK(dout_in.scalar_type() == q.scalar_type() && out_in.scalar_type() == q.scalar_type(),
              "attention_bwd: dout/out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Nq,
              "attention_bwd: lse must be float32 (B, H, Nq)");
  auto dout = last_unit(dout_in), out = last_unit(out_in);
  auto lse = lse_in.contiguous();
  // varlen: rows not covered by any sequence must read as zero gradients
  auto dq = ex.varlen ? at::zeros_like(q, at::MemoryFormat::Contiguous) : at::empty({B, H, Nq, D}, q.options());
  auto dk = ex.varlen ? at::zeros({B, Hkv, Nk, D}, k.options()) : at::empty({B, Hkv, Nk, D}, k.options());
  auto dv = ex.varlen ? at::zeros({B, Hkv, Nk, D}, v.options()) : at::empty({B, Hkv, Nk, D}, v.options());
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor dbias = bias_requires_grad ? at::zeros({B, H, Nq, Nk}, fopt) : at::empty({0}, fopt);
  if (B * H * Nq == 0 || B * Hkv * Nk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dbias};
  }
  auto delta = at::empty({B, H, Nq}, fopt);
  int64_t dos[3], qs[3], ks[3], vs[3], os[3];
  strides3(dout, dos);
  strides3(q, qs);
  strides3(k, ks);
  strides3(v, vs);
  strides3(out, os);
  check_launch(
      pyattn_cuda_attention_bwd(
          dt, dout.data_ptr(), dos, q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs, out.data_ptr(), os,
          lse.data_ptr<float>(), ex.bias.defined() ? ex.bias.data_ptr() : nullptr, ex.bias_dtype, ex.bias_st,
          ex.alibi.defined() ? ex.alibi.data_ptr<float>() : nullptr, ex.alibi_st,
          ex.kpm.defined() ? reinterpret_cast<const uint8_t*>(ex.kpm.data_ptr<bool>()) : nullptr, ex.kpm_st,
          ex.varlen ? ex.cu_q.data_ptr<int32_t>() : nullptr, ex.varlen ? ex.cu_k.data_ptr<int32_t>() : nullptr,
          ex.num_seqs, B, H, Hkv, Nq, Nk, D, max_seqlen_q, max_seqlen_k, static_cast<float>(scale), window_left,
          window_right, bottom_right ? 1 : 0, static_cast<float>(dropout_p), dropout_threshold, seed,
          delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
          bias_requires_grad ? dbias.data_ptr<float>() : nullptr, stream()),
      "attention_bwd");
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyattn_cuda, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor xin, Tensor? weight, Tensor rstd, Tensor? dh) -> (Tensor, Tensor)");
  m.def("glu_fwd(Tensor gate, Tensor up, int activation) -> Tensor");
  m.def("glu_bwd(Tensor dout, Tensor gate, Tensor up, int activation) -> (Tensor, Tensor)");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, "
      "int window_right, bool bottom_right, float dropout_p, int dropout_threshold, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, "
      "Tensor? alibi_slopes, Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, float dropout_p, "
      "int dropout_threshold, int seed, bool bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyattn_cuda, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace pyattn_cuda

// ====================================================================================================
// KV-cache decoding attention (csrc/cuda/decode.cu): pyattn_cuda.decode_fwd / pyattn_cuda.decode_append.
// A self-contained block: its own launcher declarations, checks and op registration.
// ====================================================================================================
extern "C" {
cudaError_t pyattn_cuda_decode_fwd(int dtype, const void* q, const int64_t* q_st, const void* k, const int64_t* k_st,
                                   const void* v, const int64_t* v_st, const int32_t* seqlens,
                                   const int32_t* block_table, int64_t bt_s0, int64_t bt_s1, int64_t page_size,
                                   const float* alibi, int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t D,
                                   float scale, int64_t window_left, int64_t window_right, int64_t n_appended,
                                   int64_t splits, void* out, float* lse, float* part_out, float* part_lse,
                                   cudaStream_t stream);
cudaError_t pyattn_cuda_decode_append(int dtype, void* cache, const int64_t* c_st, const void* src,
                                      const int64_t* s_st, const int32_t* seqlens, const int32_t* block_table,
                                      int64_t bt_s0, int64_t bt_s1, int64_t page_size, int64_t B, int64_t Hkv,
                                      int64_t N, int64_t D, cudaStream_t stream);
}

namespace pyattn_cuda_decode {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "pyattn_cuda.decode: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

// Arguments are validated by pyattn/ops/decode.py; these checks guard memory safety only.
std::tuple<at::Tensor, at::Tensor> decode_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                              const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                              const std::optional<at::Tensor>& alibi_slopes, double scale,
                                              int64_t window_left, int64_t window_right, int64_t n_appended,
                                              int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  cache_seqlens.device() == q.device(), "decode_fwd: tensors must be on one CUDA device");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_fwd: 4-D q and caches expected");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "decode_fwd: unit last strides");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_fwd: dtype mismatch");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(), "decode_fwd: cache_seqlens");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k_cache.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && D <= 256 && num_splits >= 1, "decode_fwd: heads, head dim or splits");
  auto out = at::empty({B, H, Nq, D}, q.options());
  auto lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || Nq == 0 || D == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  const int64_t R = (H / Hkv) * Nq;
  at::Tensor part_out, part_lse;
  if (num_splits > 1) {
    part_out = at::empty({B * Hkv * num_splits * R * D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({B * Hkv * num_splits * R}, q.options().dtype(at::kFloat));
  }
  at::Tensor slopes;
  if (alibi_slopes.has_value()) slopes = alibi_slopes->to(at::kFloat).expand({B, H}).contiguous();
  const bool paged = block_table.has_value();
  if (paged) TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2, "decode_fwd: block_table");
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t vs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const cudaError_t err = pyattn_cuda_decode_fwd(
      dtype_code(q), q.data_ptr(), qs, k_cache.data_ptr(), ks, v_cache.data_ptr(), vs,
      cache_seqlens.data_ptr<int32_t>(), paged ? block_table->data_ptr<int32_t>() : nullptr,
      paged ? block_table->stride(0) : 0, paged ? block_table->stride(1) : 0, paged ? k_cache.size(2) : 0,
      slopes.defined() ? slopes.data_ptr<float>() : nullptr, B, H, Hkv, Nq, D, static_cast<float>(scale),
      window_left, window_right, n_appended, num_splits, out.data_ptr(), lse.data_ptr<float>(),
      num_splits > 1 ? part_out.data_ptr<float>() : nullptr, num_splits > 1 ? part_lse.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "pyattn_cuda: decode_fwd failed: ", cudaGetErrorString(err));
  return {out, lse};
}

void decode_append(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(k_new.dim() == 4 && v_new.sizes() == k_new.sizes(), "decode_append: k_new / v_new shapes");
  TORCH_CHECK(k_new.scalar_type() == k_cache.scalar_type() && v_new.scalar_type() == v_cache.scalar_type(),
              "decode_append: dtype mismatch");
  TORCH_CHECK(k_cache.is_cuda() && k_new.device() == k_cache.device() && cache_seqlens.device() == k_cache.device(),
              "decode_append: tensors must be on one CUDA device");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(), "decode_append: cache_seqlens");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const bool paged = block_table.has_value();
  const int64_t B = k_new.size(0), Hkv = k_new.size(1), N = k_new.size(2), D = k_new.size(3);
  for (int which = 0; which < 2; ++which) {
    at::Tensor& cache = which == 0 ? k_cache : v_cache;
    const at::Tensor& src = which == 0 ? k_new : v_new;
    const int64_t cs[3] = {cache.stride(0), cache.stride(1), cache.stride(2)};
    const int64_t ss[4] = {src.stride(0), src.stride(1), src.stride(2), src.stride(3)};
    const cudaError_t err = pyattn_cuda_decode_append(
        dtype_code(cache), cache.data_ptr(), cs, src.data_ptr(), ss, cache_seqlens.data_ptr<int32_t>(),
        paged ? block_table->data_ptr<int32_t>() : nullptr, paged ? block_table->stride(0) : 0,
        paged ? block_table->stride(1) : 0, cache.size(2), B, Hkv, N, D, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "pyattn_cuda: decode_append failed: ", cudaGetErrorString(err));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyattn_cuda, m) {
  m.def("decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? alibi_slopes, float scale, int window_left, int window_right, int n_appended, int num_splits) "
        "-> (Tensor, Tensor)");
  m.def("decode_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
        "Tensor? block_table) -> ()");
}

TORCH_LIBRARY_IMPL(pyattn_cuda, CUDA, m) {
  m.impl("decode_fwd", &decode_fwd);
  m.impl("decode_append", &decode_append);
}

}  // namespace pyattn_cuda_decode
