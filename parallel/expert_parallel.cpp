#include "parallel/expert_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include "parallel/autograd_group.h"

namespace loom {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor exchange_rows(ProcessGroup& group, const torch::Tensor& input, const std::vector<int64_t>& input_splits,
                            const std::vector<int64_t>& output_splits) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape[0] = std::accumulate(output_splits.begin(), output_splits.end(), int64_t{0});
  torch::Tensor output = at::empty(shape, input.options());
  group.all_to_all(output, input.contiguous(), {input_splits, output_splits})->wait();
  return output;
}

struct AllToAllRows : torch::autograd::Function<AllToAllRows> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, ProcessGroup* group,
                               const std::vector<int64_t>& input_splits, const std::vector<int64_t>& output_splits) {
    save_group(ctx, *group);
    ctx->saved_data["input_splits"] = input_splits;
    ctx->saved_data["output_splits"] = output_splits;
    return exchange_rows(*group, input, input_splits, output_splits);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> input_splits = ctx->saved_data["input_splits"].toIntVector();
    const std::vector<int64_t> output_splits = ctx->saved_data["output_splits"].toIntVector();
    return {exchange_rows(saved_group(ctx), grads[0], output_splits, input_splits), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor all_to_all_rows(ProcessGroup& group, const torch::Tensor& input, const std::vector<int64_t>& input_splits,
                              const std::vector<int64_t>& output_splits) {
  return AllToAllRows::apply(input, &group, input_splits, output_splits);
}

namespace {

// Where the expert number of an expert parameter's name lies:
// "model.layers.3.mlp.experts.5.up_proj.weight" -> the "5".
std::pair<size_t, size_t> expert_number_span(const std::string& name) {
  static constexpr std::string_view kExperts = ".experts.";
  const size_t begin = name.find(kExperts) + kExperts.size();
  return {begin, name.find('.', begin)};
}

int64_t expert_number(const std::string& name) {
  const auto [begin, end] = expert_number_span(name);
  return std::stoll(name.substr(begin, end - begin));
}

std::string with_expert_number(const std::string& name, int64_t number) {
  const auto [begin, end] = expert_number_span(name);
  return name.substr(0, begin) + std::to_string(number) + name.substr(end);
}

}  // namespace

NamedTensors gather_experts(ProcessGroup& ep, const NamedTensors& local) {
  // Each rank holds a contiguous run of experts, the same number on every
  // rank (Note [expert exchange]): rank r's j-th is expert r * held + j.
  int64_t first = -1, last = -1;
  for (const auto& [name, tensor] : local) {
    if (!is_expert_parameter(name)) continue;
    const int64_t e = expert_number(name);
    first = first < 0 ? e : std::min(first, e);
    last = std::max(last, e);
  }
  const int64_t held = last - first + 1;
  NamedTensors out;
  for (const auto& [name, tensor] : local) {
    const torch::Tensor host = tensor.detach().to(torch::kCPU).contiguous();
    if (!is_expert_parameter(name)) {
      out.emplace_back(name, host);
      continue;
    }
    std::vector<int64_t> shape = host.sizes().vec();
    shape.insert(shape.begin(), ep.size());
    torch::Tensor all = torch::empty(shape, host.options());
    ep.all_gather(all.view({-1}), host.view({-1}))->wait();
    const int64_t j = expert_number(name) - first;
    for (int64_t r = 0; r < ep.size(); ++r) out.emplace_back(with_expert_number(name, r * held + j), all[r]);
  }
  return out;
}

ExpertParallelExchange::ExpertParallelExchange(ProcessGroup& ep, ProcessGroup& ep_host) : ep_(ep), ep_host_(ep_host) {
  if (ep.size() != ep_host.size() || ep.rank() != ep_host.rank()) {
    throw std::logic_error("ExpertParallelExchange: group '" + ep.name() + "' and its host twin '" + ep_host.name() +
                           "' hold other ranks");
  }
}

torch::Tensor ExpertParallelExchange::exchange(const torch::Tensor& rows, const std::vector<int64_t>& rows_per_expert,
                                               const LocalExperts& local_experts) {
  const int64_t ranks = size();
  const int64_t experts = static_cast<int64_t>(rows_per_expert.size());
  if (experts % ranks != 0) {
    throw std::logic_error("ExpertParallelExchange: " + std::to_string(experts) + " experts over " +
                           std::to_string(ranks) + " ranks");
  }
  const int64_t held = experts / ranks;
  // 1. Note [expert all-to-all]: how many rows each peer sends to each of
  // this rank's experts: arriving[s * held + j] from rank s for local expert j.
  torch::Tensor sending = torch::tensor(rows_per_expert, torch::kLong);
  torch::Tensor arriving = torch::empty({experts}, torch::kLong);
  ep_host_.all_to_all(arriving, sending)->wait();
  const int64_t* from = arriving.data_ptr<int64_t>();
  std::vector<int64_t> send_splits(ranks, 0), receive_splits(ranks, 0), local_rows(held, 0);
  for (int64_t r = 0; r < ranks; ++r) {
    for (int64_t j = 0; j < held; ++j) {
      send_splits[r] += rows_per_expert[r * held + j];
      receive_splits[r] += from[r * held + j];
      local_rows[j] += from[r * held + j];
    }
  }
  // 2. Dispatch; the arrivals regrouped from (source, expert) to (expert, source).
  const torch::Tensor arrived = all_to_all_rows(ep_, rows, send_splits, receive_splits);
  std::vector<int64_t> start(ranks * held);  // where (source s, expert j)'s rows begin in `arrived`
  int64_t at_row = 0;
  for (int64_t i = 0; i < ranks * held; ++i) {
    start[i] = at_row;
    at_row += from[i];
  }
  std::vector<int64_t> by_expert;
  by_expert.reserve(at_row);
  for (int64_t j = 0; j < held; ++j) {
    for (int64_t s = 0; s < ranks; ++s) {
      for (int64_t k = 0; k < from[s * held + j]; ++k) by_expert.push_back(start[s * held + j] + k);
    }
  }
  const torch::Tensor gather = torch::tensor(by_expert, torch::kLong).to(rows.device());
  // 3. This rank's experts.
  const torch::Tensor outputs = local_experts(arrived.index_select(0, gather), local_rows);
  // 4. Back in arrival order, then home.
  const torch::Tensor scatter = at::empty_like(gather).index_copy_(0, gather, at::arange(at_row, gather.options()));
  return all_to_all_rows(ep_, outputs.index_select(0, scatter), receive_splits, send_splits);
}

}  // namespace loom
