// `loom plan --calibrate [CONFIG] [--output FILE] [--ranks N] [--name NAME]`:
// measures this machine's rates and writes a machine profile
// (plan/machine_profile.h) for `loom plan --machine FILE`.
//
// Started without an MPI launcher, it starts itself under `mpirun -np N`
// (default 2) so that the ranks measure together: the compute rates with
// every rank busy at once (as in training, where ranks share the cores and
// the memory bus), then the collectives between them. On the CPU each rank
// uses torch's thread count (OMP_NUM_THREADS, as training does).
//
// What it measures, at the shapes of CONFIG (default configs/tiny.yaml) so
// that the rates are those of the model's own matmuls:
//   matmul_flops      each projection's forward and two backward products
//                     ([tokens, in] x [in, out] and its transposes), FLOPs / time
//   attention_flops   scaled_dot_product_attention (causal, GQA) forward and
//                     backward, at 3 x 4 b s^2 d FLOPs per head
//   memory_bytes_per_s  a layer's elementwise ops (loom's RMSNorm, rotary,
//                     SwiGLU, residual adds) forward and backward: the bytes
//                     plan::layer_elementwise_bytes counts / time
//   stream_bytes_per_s  loom's AdamW step and gradient clipping over as many
//                     elements as the model has: plan::kOptimizerBytesPerElement
//                     per element / time
//   op_overhead_s     one add of two one-element tensors
//   links             all-reduce of 8 bytes (latency) and of one micro-batch's
//                     residual stream, at least 1 MiB (bus bandwidth), over the
//                     ranks; the same figures are written for inter_node, since
//                     one machine has no second node
#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "launch/cli.h"
#include "launch/commands.h"
#include "parallel/mpi_process_group.h"
#include "plan/machine_profile.h"
#include "plan/time_model.h"
#include "config/config.h"
#include "trainer/device.h"
#include "model/kernels/fused_ops.h"
#include "model/layers.h"
#include "model/llama.h"
#include "optim/optimizer.h"
#include "util/error.h"

namespace loom {

namespace {

using Clock = std::chrono::steady_clock;

// The median of `repeats` timings of `work` (after one untimed run),
// seconds. The median rather than the fastest: the ranks measure at once,
// as they train, and the fastest timing would be one in which another rank
// happened to leave the shared core, cache or memory bus alone.
template <typename F>
double median_seconds(int repeats, F work) {
  work();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = Clock::now();
    work();
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Shapes {
  int64_t tokens, hidden, q, kv, inter, vocab, batch, seq, heads, kv_heads, head_dim;
};

Shapes shapes_of(const Config& config) {
  const ModelConfig& m = config.model;
  const int64_t seq = config.data.seq_len > 0 ? config.data.seq_len : m.max_seq_len;
  const int64_t batch = config.batch.micro_batch_size;
  return {batch * seq, m.hidden_size, m.num_heads * m.head_size(), m.kv_heads() * m.head_size(), m.intermediate_size,
          m.vocab_size, batch, seq, m.num_heads, m.kv_heads(), m.head_size()};
}

// FLOP/s of the model's projections: forward x W^T and backward's g W and g^T x.
double matmul_rate(const Shapes& s, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  const std::vector<std::pair<int64_t, int64_t>> linears = {
      {s.hidden, s.q}, {s.hidden, s.kv}, {s.hidden, s.kv}, {s.q, s.hidden},
      {s.hidden, s.inter}, {s.hidden, s.inter}, {s.inter, s.hidden}, {s.hidden, s.vocab}};
  double flops = 0, seconds = 0;
  for (const auto& [in, out] : linears) {
    const at::Tensor x = at::full({s.tokens, in}, 0.5, options), w = at::full({out, in}, 0.25, options);
    const at::Tensor g = at::full({s.tokens, out}, 0.125, options);
    seconds += median_seconds(5, [&] {
      at::Tensor y = at::matmul(x, w.t());
      at::Tensor dx = at::matmul(g, w);
      at::Tensor dw = at::matmul(g.t(), x);
    });
    flops += 3 * 2.0 * static_cast<double>(s.tokens) * static_cast<double>(in) * static_cast<double>(out);
  }
  return flops / seconds;
}

// Nominal FLOP/s of attention: 4 b s^2 d per head forward, twice that backward.
double attention_rate(const Shapes& s, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  const at::Tensor q = at::full({s.batch, s.heads, s.seq, s.head_dim}, 0.1, options).requires_grad_(true);
  const at::Tensor k = at::full({s.batch, s.kv_heads, s.seq, s.head_dim}, 0.2, options).requires_grad_(true);
  const at::Tensor v = at::full({s.batch, s.kv_heads, s.seq, s.head_dim}, 0.3, options).requires_grad_(true);
  const bool grouped = s.heads != s.kv_heads;
  const double seconds = median_seconds(3, [&] {
    at::Tensor out = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, std::nullopt,
                                                      /*enable_gqa=*/grouped);
    torch::autograd::backward({out.sum()});
  });
  const double flops = 3 * 4.0 * static_cast<double>(s.batch) * static_cast<double>(s.seq) *
                       static_cast<double>(s.seq) * static_cast<double>(s.heads * s.head_dim);
  return flops / seconds;
}

// Bytes per second of a decoder layer's own elementwise ops (loom's RMSNorm
// twice, rotary on q and k, SwiGLU, two residual adds), forward and
// backward, fp32, at the config's shapes: the bytes plan::layer_elementwise_bytes
// counts for them, over the time they take (the allocations autograd makes
// for each op's output included).
double memory_rate(const Config& config, const Shapes& s) {
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  RMSNorm norm1(s.hidden, 1e-5), norm2(s.hidden, 1e-5);
  const at::Tensor x = at::full({s.batch, s.seq, s.hidden}, 0.5, fp32).requires_grad_(true);
  const at::Tensor q = at::full({s.batch, s.heads, s.seq, s.head_dim}, 0.1, fp32).requires_grad_(true);
  const at::Tensor k = at::full({s.batch, s.kv_heads, s.seq, s.head_dim}, 0.2, fp32).requires_grad_(true);
  const at::Tensor gate = at::full({s.batch, s.seq, s.inter}, 0.3, fp32).requires_grad_(true);
  const at::Tensor up = at::full({s.batch, s.seq, s.inter}, 0.4, fp32).requires_grad_(true);
  const at::Tensor cos = at::full({s.seq, s.head_dim}, 0.6, fp32), sin = at::full({s.seq, s.head_dim}, 0.8, fp32);
  const double seconds = median_seconds(5, [&] {
    const at::Tensor h = x + norm1.forward(x);
    const at::Tensor out = h + norm2.forward(h);
    const at::Tensor loss = out.sum() + kernels::rotary(q, cos, sin).sum() + kernels::rotary(k, cos, sin).sum() +
                            kernels::swiglu(gate, up).sum();
    torch::autograd::backward({loss});
  });
  const double bytes = 3 * plan::layer_elementwise_bytes(config.model, s.tokens, 1, false, false);
  return bytes / seconds;
}

// Bytes per second of loom's AdamW step (with gradient clipping) over as
// many fp32 elements as the model has (at most 2^26, in eight tensors), at
// the bytes plan::kOptimizerBytesPerElement counts per element.
double stream_rate(const Config& config) {
  const int64_t per_tensor = std::min<int64_t>(count_parameters(config.model), int64_t{1} << 26) / 8;
  NamedTensors params;
  int64_t elements = 0;
  for (int i = 0; i < 8; ++i) {
    at::Tensor p = at::full({per_tensor}, 0.01f).requires_grad_(true);
    p.mutable_grad() = at::full({per_tensor}, 0.001f);
    elements += p.numel();
    params.emplace_back("model.layers." + std::to_string(i) + ".mlp.up_proj.weight", p);
  }
  AdamW optimizer(params, AdamWOptions{});
  const std::vector<at::Tensor> tensors = optimizer.params();
  const double seconds = median_seconds(5, [&] {
    clip_grad_norm(tensors, 1.0);
    optimizer.step(1e-4);
  });
  return plan::kOptimizerBytesPerElement * static_cast<double>(elements) / seconds;
}

double op_overhead() {
  const at::Tensor a = at::ones({1}), b = at::ones({1});
  constexpr int kOps = 2000;
  return median_seconds(3, [&] {
           for (int i = 0; i < kOps; ++i) at::add(a, b);
         }) /
         kOps;
}

// Latency (per ring step) and bus bandwidth of `group`'s all-reduce: 8
// bytes for the latency; for the bandwidth the model's residual stream of
// one micro-batch ([tokens, hidden] fp32, at least 1 MiB), the message
// tensor parallelism sends four times per layer.
plan::LinkProfile measure_link(ProcessGroup& group, const Shapes& s) {
  const double n = static_cast<double>(group.size());
  const double steps = 2 * (n - 1);
  at::Tensor small = at::ones({2});
  const double small_s = median_seconds(50, [&] { group.all_reduce(small)->wait(); });
  const int64_t floats = std::max<int64_t>(s.tokens * s.hidden, 256 * 1024);
  at::Tensor large = at::ones({floats});
  const double large_s = median_seconds(9, [&] { group.all_reduce(large)->wait(); });
  plan::LinkProfile link;
  link.latency_s = small_s / steps;
  link.bytes_per_s = steps / n * 4.0 * static_cast<double>(floats) / std::max(large_s - steps * link.latency_s, 1e-9);
  return link;
}

}  // namespace

const CommandSpec& plan_calibrate_spec() {
  static const CommandSpec spec{
      .name = "plan --calibrate",
      .synopsis = "[CONFIG] [OPTIONS]",
      .summary = "measure this machine and write a machine profile for loom plan (docs/plan.md)",
      .arguments = {{"CONFIG", "the config whose shapes are measured (default configs/tiny.yaml)"}},
      .flags = {{"calibrate", "", "measure this machine and write a profile (this command)"},
                {"output", "FILE", "profile to write (default configs/machines/this-machine.yaml)"},
                {"ranks", "N", "ranks to measure with, under mpirun (default 2)"},
                {"name", "NAME", "the profile's name (default this-machine)"},
                {"set", "KEY=VALUE", "override a key of CONFIG", kRepeatable}},
      .examples = {"loom plan --calibrate configs/tiny.yaml --output configs/machines/this-machine.yaml"},
  };
  return spec;
}

int plan_calibrate(const std::vector<std::string>& argv) {
  Args args(plan_calibrate_spec(), argv);
  if (args.positional().size() > 1) args.expect_positional(1, "at most one CONFIG (whose shapes are measured)");
  const std::string config_path = args.positional().empty() ? "configs/tiny.yaml" : args.positional()[0];
  const std::string output = args.get_or("output", "configs/machines/this-machine.yaml");
  const int64_t ranks = args.get_int("ranks", 2);
  if (ranks < 1) throw BadInput("loom plan: --ranks must be >= 1");
  const Config config = load_config(config_path, args.all("set"));  // refused here, before mpirun, when bad

  if (!launched_by_mpi() && ranks > 1) {
    return rerun_under_mpirun("plan", argv, ranks);
  }

  std::unique_ptr<MpiSession> session;
  std::unique_ptr<MpiProcessGroup> world;
  if (launched_by_mpi()) {
    session = std::make_unique<MpiSession>();
    world = session->world(std::chrono::milliseconds(600000));
  }
  const bool writer = world == nullptr || world->rank() == 0;
  auto together = [&] {
    if (world) world->barrier()->wait();
  };
  const Shapes shapes = shapes_of(config);
  plan::MachineProfile profile;
  profile.name = args.get_or("name", "this-machine");
  profile.source = "measured";
  profile.device = device_name(c10::Device(c10::kCPU)) + ", " + std::to_string(at::get_num_threads()) +
                   " thread(s) per rank, " + std::to_string(world ? world->size() : 1) + " ranks measuring at once";
  profile.notes = "loom plan --calibrate " + config_path + ": rates at the config's shapes (tokens " +
                  std::to_string(shapes.tokens) + ", hidden " + std::to_string(shapes.hidden) +
                  "); inter_node repeats intra_node (one machine)";
  together();
  profile.matmul_flops_fp32 = matmul_rate(shapes, at::kFloat);
  together();
  profile.matmul_flops_bf16 = matmul_rate(shapes, at::kBFloat16);
  together();
  profile.attention_flops_fp32 = attention_rate(shapes, at::kFloat);
  together();
  profile.attention_flops_bf16 = attention_rate(shapes, at::kBFloat16);
  together();
  profile.memory_bytes_per_s = memory_rate(config, shapes);
  together();
  profile.stream_bytes_per_s = stream_rate(config);
  together();
  profile.op_overhead_s = op_overhead();
  // The peak MFU is relative to, as loom train measures it on the CPU: the matmul rate.
  profile.peak_flops_fp32 = profile.matmul_flops_fp32;
  profile.peak_flops_bf16 = profile.matmul_flops_bf16;
  // On the CPU a rank polls MPI only between its own ops, so buckets do not
  // progress while backward computes.
  profile.dp_overlap = 0.0;
  if (world && world->size() > 1) {
    together();
    profile.intra_node = measure_link(*world, shapes);
  } else {
    profile.intra_node = {1e10, 1e-6};
    profile.notes += "; links not measured (one rank): placeholders";
  }
  profile.inter_node = profile.intra_node;
  if (writer) {
    std::filesystem::create_directories(std::filesystem::absolute(output).parent_path());
    plan::save_machine_profile(profile, output);
    std::cout << "loom plan: wrote " << output << ": matmul " << profile.matmul_flops_fp32 / 1e9 << " GFLOP/s fp32, "
              << profile.matmul_flops_bf16 / 1e9 << " bf16; attention " << profile.attention_flops_fp32 / 1e9
              << " GFLOP/s fp32; memory " << profile.memory_bytes_per_s / 1e9 << " GB/s; op "
              << profile.op_overhead_s * 1e6 << " us; all-reduce " << profile.intra_node.bytes_per_s / 1e9
              << " GB/s, " << profile.intra_node.latency_s * 1e6 << " us per step\n";
  }
  return kExitOk;
}

}  // namespace loom
