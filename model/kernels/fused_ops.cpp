#include "model/kernels/fused_ops.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>

#ifdef LOOM_WITH_CUDA
#include "model/kernels/fused_cuda.h"
#include "util/cuda_part.h"
#endif

namespace loom::kernels {

#ifdef LOOM_WITH_CUDA
const cuda::Launchers& cuda::launchers() {
  static const auto* table = static_cast<const Launchers*>(cuda_part_table(kLaunchersEntry));
  return *table;
}
#endif

namespace {

bool fused_dtype(const torch::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kHalf;
}

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// torch's default ignore_index: rows with this target count neither in the
// loss nor in the mean's denominator.
constexpr int64_t kIgnoreIndex = -100;

#ifdef LOOM_WITH_CUDA

class SwiGluFunction : public torch::autograd::Function<SwiGluFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& gate, const torch::Tensor& up) {
    // Linear outputs are contiguous already; anything else is copied once.
    torch::Tensor gate_c = gate.contiguous(), up_c = up.contiguous();
    torch::Tensor out = at::empty_like(gate_c, at::MemoryFormat::Contiguous);
    cuda::launchers().swiglu_forward(gate_c, up_c, out);
    ctx->save_for_backward({gate_c, up_c});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const tensor_list saved = ctx->get_saved_variables();
    const torch::Tensor& gate = saved[0];
    const torch::Tensor& up = saved[1];
    torch::Tensor grad = grads[0].contiguous();
    torch::Tensor d_gate = at::empty_like(gate), d_up = at::empty_like(up);
    cuda::launchers().swiglu_backward(grad, gate, up, d_gate, d_up);
    return {d_gate, d_up};
  }
};

// The kernels read rows with a contiguous last dimension and any other
// strides, so attention's transposed q and k views are read in place.
torch::Tensor last_dim_contiguous(const torch::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_bhtd, const torch::Tensor& cos_td,
                               const torch::Tensor& sin_td) {
    torch::Tensor x = last_dim_contiguous(x_bhtd);
    torch::Tensor cos = cos_td.contiguous(), sin = sin_td.contiguous();
    // Same strides as x where x is dense (a transposed view stays one), so
    // SDPA sees the layout the unfused ops give it.
    torch::Tensor out = last_dim_contiguous(at::empty_like(x));
    cuda::launchers().rotary(x, cos, sin, out, /*backward=*/false);
    // cos and sin are constants of the positions; they get no gradient.
    ctx->save_for_backward({cos, sin});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const tensor_list saved = ctx->get_saved_variables();
    torch::Tensor grad = last_dim_contiguous(grads[0]);
    torch::Tensor dx = last_dim_contiguous(at::empty_like(grad));
    cuda::launchers().rotary(grad, saved[0], saved[1], dx, /*backward=*/true);
    return {dx, torch::Tensor(), torch::Tensor()};
  }
};

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
    // The head's output is contiguous already; anything else is copied once.
    torch::Tensor logits = logits_nv.contiguous(), targets = targets_n.contiguous();
    const auto fp32 = logits.options().dtype(torch::kFloat);
    torch::Tensor loss_rows = at::empty({logits.size(0)}, fp32), lse_rows = at::empty({logits.size(0)}, fp32);
    cuda::launchers().cross_entropy_forward(logits, targets, kIgnoreIndex, loss_rows, lse_rows);
    // The rows counted, on the device: the mean needs no synchronisation.
    // No rows counted gives 0 / 0 = NaN, as torch's mean does.
    torch::Tensor counted = (targets != kIgnoreIndex).sum().to(torch::kFloat);
    ctx->save_for_backward({logits, targets, lse_rows, counted});
    return loss_rows.sum() / counted;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const tensor_list saved = ctx->get_saved_variables();
    const torch::Tensor &logits = saved[0], &targets = saved[1], &lse_rows = saved[2], &counted = saved[3];
    // d loss / d x_ij = (softmax_ij - [j == t_i]) / counted, times the
    // loss's own gradient: one fp32 scalar, left on the device.
    torch::Tensor scale = (grads[0].to(torch::kFloat) / counted).contiguous();
    torch::Tensor d_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
    cuda::launchers().cross_entropy_backward(logits, targets, kIgnoreIndex, lse_rows, scale, d_logits);
    return {d_logits, torch::Tensor()};
  }
};

// The decoder layer's residual add and the norm after it. The weight comes
// in the stream's dtype (cast by the caller, so that autograd takes its
// gradient on to the fp32 parameter).
class AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const torch::Tensor& residual, const torch::Tensor& branch,
                             const torch::Tensor& weight, double eps) {
    const torch::Tensor r = residual.contiguous(), b = branch.contiguous(), w = weight.contiguous();
    torch::Tensor h = at::empty_like(r), y = at::empty_like(r);
    const int64_t hidden = r.size(-1);
    torch::Tensor rstd = at::empty({hidden == 0 ? 0 : r.numel() / hidden}, r.options().dtype(torch::kFloat));
    cuda::launchers().add_rms_norm_forward(r, b, w, eps, h, y, rstd);
    ctx->save_for_backward({h, w, rstd});
    return {h, y};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const tensor_list saved = ctx->get_saved_variables();
    const torch::Tensor &h = saved[0], &w = saved[1], &rstd = saved[2];
    const torch::Tensor grad_h = grads[0].defined() ? grads[0].contiguous() : torch::Tensor();
    if (!grads[1].defined()) return {grad_h, grad_h, torch::Tensor(), torch::Tensor()};
    const torch::Tensor grad_y = grads[1].contiguous();
    const int64_t hidden = h.size(-1), rows = hidden == 0 ? 0 : h.numel() / hidden;
    if (rows == 0) return {grad_y, grad_y, at::zeros_like(w), torch::Tensor()};
    // Enough blocks to fill the GPU (each keeps `hidden` fp32 sums), few
    // enough that their partial weight gradients stay small to add up.
    const int64_t blocks = std::clamp<int64_t>(rows, 1, 512);
    torch::Tensor d_h = at::empty_like(h);
    torch::Tensor partial = at::empty({blocks, hidden}, h.options().dtype(torch::kFloat));
    cuda::launchers().add_rms_norm_backward(grad_y, grad_h, h, w, rstd, d_h, partial);
    return {d_h, d_h, partial.sum(0).to(w.scalar_type()), torch::Tensor()};
  }
};

#endif  // LOOM_WITH_CUDA

// Note [Cross-entropy on the CPU]
// torch's cross_entropy on [rows, vocab] fp32 logits writes three more
// tensors of that size: log_softmax's output in forward, then nll_loss's
// gradient (zeros with one value per row) and log_softmax's gradient in
// backward. At SmolLM2's vocabulary and 2048 tokens each is 400 MB, and
// together with the passes over them they took about 1 s of a 15 s CPU step
// (profile of configs/smollm2-135m.yaml, 2 threads). This function writes
// only the gradient. Forward takes each row's logsumexp, a block of rows at a
// time so the temporaries stay in cache; backward writes exp(x - lse) scaled
// by the loss's gradient over the rows counted, block by block, and then
// subtracts that scale at each row's target. The results agree with torch's
// to fp32 rounding (logsumexp against log_softmax's x - max - log sum).
constexpr int64_t kCpuBlockElements = int64_t{1} << 18;  // 1 MiB of fp32 per block

int64_t rows_per_block(int64_t vocab) { return std::max<int64_t>(1, kCpuBlockElements / std::max<int64_t>(vocab, 1)); }

class CpuCrossEntropyFunction : public torch::autograd::Function<CpuCrossEntropyFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
    torch::Tensor logits = logits_nv.contiguous(), targets = targets_n.contiguous();
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    torch::Tensor counted_rows = targets != kIgnoreIndex;
    // torch refuses a target outside the vocabulary; so does this.
    if (rows > 0) {
      torch::Tensor outside = counted_rows & ((targets < 0) | (targets >= vocab));
      TORCH_CHECK(!outside.any().item<bool>(), "cross_entropy: a target is outside [0, ", vocab, ")");
    }
    torch::Tensor columns = targets.clamp_min(0);
    torch::Tensor lse = at::empty({rows}, logits.options());
    const int64_t block = rows_per_block(vocab);
    for (int64_t first = 0; first < rows; first += block) {
      const int64_t n = std::min(block, rows - first);
      torch::Tensor out = lse.narrow(0, first, n);
      at::logsumexp_out(out, logits.narrow(0, first, n), {1}, /*keepdim=*/false);
    }
    torch::Tensor picked = logits.gather(1, columns.unsqueeze(1)).squeeze(1);
    torch::Tensor loss_rows = at::where(counted_rows, lse - picked, at::zeros({}, logits.options()));
    // No rows counted gives 0 / 0 = NaN, as torch's mean does.
    torch::Tensor counted = counted_rows.sum().to(torch::kFloat);
    ctx->save_for_backward({logits, columns, counted_rows, lse, counted});
    return loss_rows.sum() / counted;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const tensor_list saved = ctx->get_saved_variables();
    const torch::Tensor &logits = saved[0], &columns = saved[1], &counted_rows = saved[2], &lse = saved[3],
                        &counted = saved[4];
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    // d loss / d x_ij = (softmax_ij - [j == t_i]) * g / counted for the rows
    // counted, 0 for the others.
    // (where, not a product: with no row counted g / counted is not finite.)
    torch::Tensor row_scale =
        at::where(counted_rows, grads[0].to(torch::kFloat) / counted, at::zeros({}, logits.options()));
    torch::Tensor d_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
    const int64_t block = rows_per_block(vocab);
    for (int64_t first = 0; first < rows; first += block) {
      const int64_t n = std::min(block, rows - first);
      torch::Tensor out = d_logits.narrow(0, first, n);
      at::sub_out(out, logits.narrow(0, first, n), lse.narrow(0, first, n).unsqueeze(1));
      out.exp_();
      out.mul_(row_scale.narrow(0, first, n).unsqueeze(1));
    }
    d_logits.scatter_add_(1, columns.unsqueeze(1), row_scale.neg().unsqueeze(1));
    return {d_logits, torch::Tensor()};
  }
};

}  // namespace

bool fused_kernels_built() {
#ifdef LOOM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

torch::Tensor swiglu_unfused(const torch::Tensor& gate, const torch::Tensor& up) { return at::silu(gate) * up; }

bool swiglu_takes_fused_path(const torch::Tensor& gate, const torch::Tensor& up) {
  return fused_kernels_built() && gate.is_cuda() && up.device() == gate.device() && fused_dtype(gate) &&
         up.scalar_type() == gate.scalar_type() && up.sizes() == gate.sizes();
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
#ifdef LOOM_WITH_CUDA
  if (swiglu_takes_fused_path(gate, up)) return SwiGluFunction::apply(gate, up);
#endif
  return swiglu_unfused(gate, up);
}

torch::Tensor rotary_unfused(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td) {
  const int64_t half = x_bhtd.size(-1) / 2;
  auto x1 = x_bhtd.narrow(-1, 0, half);
  auto x2 = x_bhtd.narrow(-1, half, half);
  auto rotated = at::cat({-x2, x1}, -1);
  auto cos = cos_td.to(x_bhtd.scalar_type());
  auto sin = sin_td.to(x_bhtd.scalar_type());
  return x_bhtd * cos + rotated * sin;
}

bool rotary_takes_fused_path(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td) {
  if (!fused_kernels_built() || !x_bhtd.is_cuda() || x_bhtd.dim() != 4 || !fused_dtype(x_bhtd)) return false;
  const int64_t tokens = x_bhtd.size(2), head_dim = x_bhtd.size(3);
  for (const torch::Tensor* table : {&cos_td, &sin_td}) {
    if (table->device() != x_bhtd.device() || table->scalar_type() != torch::kFloat || table->requires_grad() ||
        table->dim() != 2 || table->size(0) != tokens || table->size(1) != head_dim)
      return false;
  }
  return head_dim % 2 == 0;
}

torch::Tensor rotary(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td) {
#ifdef LOOM_WITH_CUDA
  if (rotary_takes_fused_path(x_bhtd, cos_td, sin_td)) return RotaryFunction::apply(x_bhtd, cos_td, sin_td);
#endif
  return rotary_unfused(x_bhtd, cos_td, sin_td);
}

torch::Tensor cross_entropy_unfused(const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
  return torch::nn::functional::cross_entropy(logits_nv.to(torch::kFloat), targets_n);
}

namespace {
// The shapes and index type both fused paths take.
bool cross_entropy_shapes(const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
  return logits_nv.dim() == 2 && logits_nv.size(1) > 0 && targets_n.device() == logits_nv.device() &&
         targets_n.dim() == 1 && targets_n.scalar_type() == torch::kLong && targets_n.size(0) == logits_nv.size(0);
}
}  // namespace

bool cross_entropy_takes_fused_path(const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
  return fused_kernels_built() && logits_nv.is_cuda() && fused_dtype(logits_nv) &&
         cross_entropy_shapes(logits_nv, targets_n);
}

bool cross_entropy_takes_cpu_path(const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
  return logits_nv.is_cpu() && logits_nv.scalar_type() == torch::kFloat && cross_entropy_shapes(logits_nv, targets_n);
}

torch::Tensor cross_entropy(const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
#ifdef LOOM_WITH_CUDA
  if (cross_entropy_takes_fused_path(logits_nv, targets_n)) return CrossEntropyFunction::apply(logits_nv, targets_n);
#endif
  if (cross_entropy_takes_cpu_path(logits_nv, targets_n)) return CpuCrossEntropyFunction::apply(logits_nv, targets_n);
  return cross_entropy_unfused(logits_nv, targets_n);
}

bool weight_gradient_takes_fused_path(const torch::Tensor& weight_grad, const torch::Tensor& grad_out,
                                      const torch::Tensor& input) {
  const auto dtype = input.scalar_type();
  return fused_kernels_built() && weight_grad.is_cuda() && weight_grad.scalar_type() == torch::kFloat &&
         weight_grad.is_contiguous() && (dtype == torch::kBFloat16 || dtype == torch::kHalf) &&
         grad_out.scalar_type() == dtype && grad_out.device() == weight_grad.device() &&
         input.device() == weight_grad.device();
}

void accumulate_weight_gradient(torch::Tensor& weight_grad, const torch::Tensor& grad_out,
                                const torch::Tensor& input) {
  at::NoGradGuard no_grad;
  const torch::Tensor g = grad_out.contiguous(), x = input.contiguous();
#ifdef LOOM_WITH_CUDA
  if (weight_gradient_takes_fused_path(weight_grad, g, x)) {
    cuda::launchers().accumulate_weight_gradient(g, x, weight_grad);
    return;
  }
#endif
  // The same sum: fp32 products of the low-precision values, added in fp32.
  weight_grad.addmm_(g.t().to(torch::kFloat), x.to(torch::kFloat));
}

AddNorm add_rms_norm_unfused(const torch::Tensor& residual, const torch::Tensor& branch, const torch::Tensor& weight,
                             double eps) {
  torch::Tensor h = residual + branch;
  torch::Tensor y = at::rms_norm(h, {h.size(-1)}, weight.to(h.scalar_type()), eps);
  return {h, y};
}

// The backward kernel keeps a row of fp32 sums in shared memory, beside a
// few words of its own, within the 48 KiB a block may use without asking:
// 8192 (32 KiB; Llama 3 70B's hidden size).
constexpr int64_t kMaxFusedNormWidth = 8192;

bool add_rms_norm_takes_fused_path(const torch::Tensor& residual, const torch::Tensor& branch,
                                   const torch::Tensor& weight) {
  const auto dtype = residual.scalar_type();
  return fused_kernels_built() && residual.is_cuda() && (dtype == torch::kBFloat16 || dtype == torch::kHalf) &&
         residual.dim() >= 1 && branch.scalar_type() == dtype && branch.sizes() == residual.sizes() &&
         branch.device() == residual.device() && weight.device() == residual.device() && weight.dim() == 1 &&
         weight.size(0) == residual.size(-1) && residual.size(-1) > 0 && residual.size(-1) <= kMaxFusedNormWidth;
}

AddNorm add_rms_norm(const torch::Tensor& residual, const torch::Tensor& branch, const torch::Tensor& weight,
                     double eps) {
#ifdef LOOM_WITH_CUDA
  if (add_rms_norm_takes_fused_path(residual, branch, weight)) {
    const tensor_list out = AddRmsNormFunction::apply(residual, branch, weight.to(residual.scalar_type()), eps);
    return {out[0], out[1]};
  }
#endif
  return add_rms_norm_unfused(residual, branch, weight, eps);
}

}  // namespace loom::kernels
