// loom_optimizer_cli: runs loom's AdamW, gradient clipping and learning-rate
// schedule on given parameters and gradients, for
// tests/interop/test_optimizer_vs_torch.py to compare with torch.
//
//   loom_optimizer_cli INPUT OUTPUT --steps N --lr X --beta1 X --beta2 X --eps X
//       --weight-decay X --decay cosine|linear|wsd|constant --warmup N
//       --train-steps N --min-lr-ratio X --clip X [--no-decay-embeddings]
//
// INPUT (safetensors) holds the initial parameters `p.NAME` and the gradient
// of every step `g.STEP.NAME` (STEP = 0 .. N-1). Its metadata entry `params`
// (comma-separated names) gives the parameter order, which the gradient norm
// depends on in its last bits; without it the file order is used.
// Each step: set the gradients, clip them to --clip (0 = no clipping; the norm
// is measured either way), take lr from the schedule, step AdamW.
// OUTPUT gets the final `p.NAME`, `lr` and `grad_norm` (F64 [N], per step),
// and the optimizer state under its state_dict() names.
//
// Exit codes as `loom`: 2 for bad input, 1 for anything else.
#include <ATen/ATen.h>

#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoints/safetensors.h"
#include "checkpoints/torch_tensors.h"
#include "config/config.h"
#include "optim/lr_schedule.h"
#include "optim/optimizer.h"
#include "util/error.h"

namespace {

int usage() {
  std::cerr << "usage: loom_optimizer_cli INPUT OUTPUT --steps N --lr X --beta1 X --beta2 X --eps X\n"
               "           --weight-decay X --decay KIND --warmup N --train-steps N --min-lr-ratio X\n"
               "           --clip X [--no-decay-embeddings]\n";
  return loom::kExitBadInput;
}

double parse_double(const std::map<std::string, std::string>& flags, const std::string& flag) {
  auto it = flags.find(flag);
  if (it == flags.end()) throw loom::BadInput(flag + " is required");
  try {
    size_t used = 0;
    const double value = std::stod(it->second, &used);
    if (used == it->second.size()) return value;
  } catch (const std::exception&) {
  }
  throw loom::BadInput(flag + " expects a number, got '" + it->second + "'");
}

int64_t parse_int(const std::map<std::string, std::string>& flags, const std::string& flag) {
  auto it = flags.find(flag);
  if (it == flags.end()) throw loom::BadInput(flag + " is required");
  try {
    size_t used = 0;
    const int64_t value = std::stoll(it->second, &used);
    if (used == it->second.size() && value >= 0) return value;
  } catch (const std::exception&) {
  }
  throw loom::BadInput(flag + " expects a non-negative integer, got '" + it->second + "'");
}

std::vector<std::string> parameter_names(const loom::safetensors::File& file) {
  std::vector<std::string> names;
  auto listed = file.metadata().find("params");
  if (listed != file.metadata().end()) {
    std::stringstream in(listed->second);
    for (std::string name; std::getline(in, name, ',');) names.push_back(name);
    return names;
  }
  for (const auto& info : file.tensors()) {
    if (info.name.starts_with("p.")) names.push_back(info.name.substr(2));
  }
  return names;
}

int run(const std::string& input, const std::string& output, const std::map<std::string, std::string>& flags,
        bool decay_embeddings) {
  loom::OptimizerConfig optimizer;
  optimizer.lr = parse_double(flags, "--lr");
  optimizer.betas = {parse_double(flags, "--beta1"), parse_double(flags, "--beta2")};
  optimizer.eps = parse_double(flags, "--eps");
  optimizer.weight_decay = parse_double(flags, "--weight-decay");
  optimizer.clip_grad_norm = parse_double(flags, "--clip");
  loom::ScheduleConfig schedule;
  auto decay = flags.find("--decay");
  if (decay == flags.end()) throw loom::BadInput("--decay is required");
  schedule.decay = decay->second;
  schedule.warmup_steps = parse_int(flags, "--warmup");
  schedule.train_steps = parse_int(flags, "--train-steps");
  schedule.min_lr_ratio = parse_double(flags, "--min-lr-ratio");
  const int64_t steps = parse_int(flags, "--steps");

  auto file = loom::safetensors::File::open(input);
  loom::NamedTensors params;
  for (const auto& name : parameter_names(file)) {
    auto tensor = loom::tensor_from_view(file.tensor("p." + name), input);
    params.emplace_back(name, tensor.requires_grad_(true));
  }
  auto options = loom::AdamWOptions::from_config(optimizer);
  options.decay_embeddings = decay_embeddings;
  loom::AdamW adamw(params, options);

  auto lrs = torch::empty({steps}, torch::kDouble);
  auto grad_norms = torch::empty({steps}, torch::kDouble);
  for (int64_t step = 0; step < steps; ++step) {
    for (auto& [name, param] : params) {
      param.mutable_grad() = loom::tensor_from_view(file.tensor("g." + std::to_string(step) + "." + name), input);
    }
    const double grad_norm = optimizer.clip_grad_norm > 0
                                 ? loom::clip_grad_norm(adamw.params(), optimizer.clip_grad_norm)
                                 : loom::grad_norm(adamw.params());
    const double lr = loom::learning_rate(optimizer, schedule, step);
    adamw.step(lr);
    lrs[step] = lr;
    grad_norms[step] = grad_norm;
  }

  std::vector<torch::Tensor> keep_alive;
  std::vector<loom::safetensors::TensorToWrite> out;
  auto add = [&](const std::string& name, const torch::Tensor& tensor) {
    keep_alive.push_back(tensor.detach().contiguous());
    out.push_back(loom::tensor_to_write(name, keep_alive.back()));
  };
  for (const auto& [name, param] : params) add("p." + name, param);
  add("lr", lrs);
  add("grad_norm", grad_norms);
  for (const auto& [name, tensor] : adamw.state_dict()) add(name, tensor);
  loom::safetensors::write_file(output, out);
  return loom::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() < 2) return usage();
  try {
    std::map<std::string, std::string> flags;
    bool decay_embeddings = true;
    for (size_t i = 2; i < args.size(); ++i) {
      if (args[i] == "--no-decay-embeddings") {
        decay_embeddings = false;
      } else if (args[i].starts_with("--") && i + 1 < args.size()) {
        flags[args[i]] = args[i + 1];
        ++i;
      } else {
        return usage();
      }
    }
    return run(args[0], args[1], flags, decay_embeddings);
  } catch (const loom::BadInput& e) {
    std::cerr << "loom_optimizer_cli: error: " << e.what() << "\n";
    return loom::kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "loom_optimizer_cli: internal error: " << e.what() << "\n";
    return loom::kExitInternal;
  }
}
