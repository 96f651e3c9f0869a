#include "parallel/topology.h"

#include <sstream>
#include <utility>

#include "util/error.h"

namespace loom {

ParallelDims ParallelDims::from_config(const Config& config, int64_t world_size) {
  const ParallelConfig& p = config.parallel;
  ParallelDims dims;
  dims.world = world_size;
  dims.tp = p.tp;
  dims.pp = p.pp;
  dims.cp = p.cp;
  const int64_t others = p.tp * p.pp * p.cp;  // the ranks of one data-parallel replica
  auto factors = [&](int64_t dp) {
    std::ostringstream os;
    os << "parallel.dp (" << (p.dp == 0 ? "auto" : std::to_string(dp)) << ")";
    if (p.cp != 1) os << " * parallel.cp (" << p.cp << ")";
    os << " * parallel.pp (" << p.pp << ") * parallel.tp (" << p.tp << ")";
    return os.str();
  };
  if (world_size < 1) throw BadInput("world size must be at least 1, got " + std::to_string(world_size));
  if (p.tp < 1 || p.pp < 1 || p.cp < 1) throw BadInput(factors(p.dp) + ": every factor must be at least 1");
  if (p.dp == 0) {
    if (world_size % others != 0) {
      throw BadInput(factors(0) + ": world size " + std::to_string(world_size) + " is not divisible by " +
                     (p.cp != 1 ? "cp * " : "") + "pp * tp = " + std::to_string(others));
    }
    dims.dp = world_size / others;
  } else {
    dims.dp = p.dp;
  }
  if (dims.dp * others != world_size) {
    throw BadInput(factors(dims.dp) + " = " + std::to_string(dims.dp * others) + " != world size (" +
                   std::to_string(world_size) + ")");
  }
  const ModelConfig& m = config.model;
  if (m.num_heads > 0 && m.num_heads % dims.tp != 0) {
    throw BadInput("parallel.tp (" + std::to_string(dims.tp) + ") must divide model.num_heads (" +
                   std::to_string(m.num_heads) + ")");
  }
  if (m.num_heads > 0 && m.kv_heads() % dims.tp != 0) {
    throw BadInput("parallel.tp (" + std::to_string(dims.tp) + ") must divide model.num_kv_heads (" +
                   std::to_string(m.kv_heads()) + ")");
  }
  // A vocabulary tp does not divide is padded on the tp ranks (Note [vocab
  // padding] in parallel/vocab_parallel.h): no constraint.
  if (m.intermediate_size > 0 && m.intermediate_size % dims.tp != 0) {
    throw BadInput("parallel.tp (" + std::to_string(dims.tp) + ") must divide model.intermediate_size (" +
                   std::to_string(m.intermediate_size) + ")");
  }
  // Each expert, and qwen2_moe's shared expert, is cut over tp as an MLP
  // (Note [experts under tensor parallelism] in model/moe.h); mixtral's
  // experts are intermediate_size wide, checked above.
  const std::pair<const char*, int64_t> expert_widths[] = {
      {"model.moe_intermediate_size", m.architecture == "mixtral" ? 0 : m.moe_intermediate_size},
      {"model.shared_expert_intermediate_size", m.shared_expert_intermediate_size}};
  for (const auto& [key, width] : expert_widths) {
    if (m.moe() && width > 0 && width % dims.tp != 0) {
      throw BadInput("parallel.tp (" + std::to_string(dims.tp) + ") must divide " + key + " (" +
                     std::to_string(width) + ")");
    }
  }
  const int64_t seq_len = config.data.seq_len > 0 ? config.data.seq_len : m.max_seq_len;
  if (p.sequence_parallel && seq_len > 0 && seq_len % dims.tp != 0) {
    throw BadInput("parallel.sequence_parallel with parallel.tp (" + std::to_string(dims.tp) +
                   "): the sequence length (data.seq_len " + std::to_string(seq_len) + ") must be divisible by tp");
  }
  if (dims.cp > 1 && seq_len > 0 && seq_len % (2 * dims.cp) != 0) {
    throw BadInput("parallel.cp (" + std::to_string(dims.cp) + "): the sequence length (data.seq_len " +
                   std::to_string(seq_len) + ") must be divisible by 2 * cp (zig-zag chunks)");
  }
  if (dims.cp > 1 && p.sequence_parallel && seq_len > 0 && (seq_len / dims.cp) % dims.tp != 0) {
    throw BadInput("parallel.sequence_parallel with parallel.cp (" + std::to_string(dims.cp) + ") and parallel.tp (" +
                   std::to_string(dims.tp) + "): a rank's share of the sequence (data.seq_len " +
                   std::to_string(seq_len) + " / cp) must be divisible by tp");
  }
  if (m.num_layers > 0 && dims.pp > m.num_layers) {
    throw BadInput("parallel.pp (" + std::to_string(dims.pp) + ") exceeds model.num_layers (" +
                   std::to_string(m.num_layers) + ")");
  }
  dims.ep = p.ep;
  if (dims.ep < 1 || dims.dp % dims.ep != 0) {
    throw BadInput("parallel.ep (" + std::to_string(dims.ep) + ") must divide dp (" + std::to_string(dims.dp) +
                   "): expert parallelism is carved out of the data-parallel ranks");
  }
  if (dims.ep > 1 && (m.num_experts <= 0 || m.num_experts % dims.ep != 0)) {
    throw BadInput("parallel.ep (" + std::to_string(dims.ep) + ") must divide model.num_experts (" +
                   std::to_string(m.num_experts) + ")" + (m.num_experts <= 0 ? ": the model has no experts" : ""));
  }
  const BatchConfig& b = config.batch;
  if (b.global_batch_size > 0 && b.global_batch_size % (b.micro_batch_size * dims.dp) != 0) {
    throw BadInput("batch.global_batch_size (" + std::to_string(b.global_batch_size) +
                   ") must be divisible by batch.micro_batch_size (" + std::to_string(b.micro_batch_size) +
                   ") * dp (" + std::to_string(dims.dp) + ")");
  }
  return dims;
}

ParallelDims::Coords ParallelDims::coords_of(int64_t rank) const {
  Coords c;
  c.tp = rank % tp;
  c.cp = (rank / tp) % cp;
  c.pp = (rank / (tp * cp)) % pp;
  c.dp = rank / (tp * cp * pp);
  return c;
}

std::string ParallelDims::describe() const {
  std::ostringstream os;
  os << "world " << world << " = dp " << dp;
  if (cp > 1) os << " x cp " << cp;
  os << " x pp " << pp << " x tp " << tp;
  if (ep > 1) os << ", experts over ep " << ep << " (dp ranks in blocks of " << ep << ")";
  for (int64_t d = 0; d < dp; ++d) {
    os << "\n  dp" << d << ":";
    for (int64_t s = 0; s < pp; ++s) {
      os << " pp" << s;
      for (int64_t c = 0; c < cp; ++c) {
        if (cp > 1) os << " cp" << c;
        os << " [";
        for (int64_t t = 0; t < tp; ++t) os << (t ? " " : "") << rank_of({d, s, t, c});
        os << "]";
      }
    }
  }
  return os.str();
}

}  // namespace loom
