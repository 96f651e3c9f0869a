// A machine profile: the rates `loom plan` turns FLOPs and bytes into
// seconds with. Written by `loom plan --calibrate` (measured on this machine)
// or by hand from public specifications (configs/machines/h100-node.yaml);
// the file says which in `source`. YAML:
//
//   name: h100-node
//   source: specification        # or: measured
//   device: NVIDIA H100 SXM5 80GB
//   notes: ...
//   compute:
//     peak_flops: {fp32: 6.7e13, bf16: 9.89e14}      # what MFU is relative to
//     matmul_flops: {fp32: ..., bf16: ...}           # achieved on the model's matmuls
//     attention_flops: {fp32: ..., bf16: ...}        # achieved, nominal 4 b s^2 d per head (causal or not)
//     memory_bytes_per_s: 3.35e12                    # a layer's elementwise ops (activation-sized)
//     stream_bytes_per_s: 3.35e12                    # AdamW and flat copies over parameter-sized tensors
//     op_overhead_s: 5e-6                            # fixed cost of one kernel or ATen op
//     dp_overlap: 1.0                                # fraction of backward that can hide gradient buckets
//   links:
//     intra_node: {bytes_per_s: 4.5e11, latency_s: 5e-6}
//     inter_node: {bytes_per_s: 5.0e10, latency_s: 1e-5}
#pragma once

#include <string>

namespace loom::plan {

struct LinkProfile {
  double bytes_per_s = 0;  // per rank and direction, as a ring collective's bus bandwidth sees it
  double latency_s = 0;    // per step of a ring collective, or per message
};

struct MachineProfile {
  std::string name;
  std::string source;  // measured | specification
  std::string device;
  std::string notes;
  double peak_flops_fp32 = 0, peak_flops_bf16 = 0;
  double matmul_flops_fp32 = 0, matmul_flops_bf16 = 0;
  double attention_flops_fp32 = 0, attention_flops_bf16 = 0;
  double memory_bytes_per_s = 0;
  double stream_bytes_per_s = 0;  // absent in the file: memory_bytes_per_s
  double op_overhead_s = 0;
  double dp_overlap = 1.0;
  LinkProfile intra_node, inter_node;
  // One node's rates to the file system that holds the run folder (the
  // optional `storage` section); 0 when the profile does not say.
  double storage_write_bytes_per_s = 0, storage_read_bytes_per_s = 0;

  double peak_flops(bool bf16) const { return bf16 ? peak_flops_bf16 : peak_flops_fp32; }
  double matmul_flops(bool bf16) const { return bf16 ? matmul_flops_bf16 : matmul_flops_fp32; }
  double attention_flops(bool bf16) const { return bf16 ? attention_flops_bf16 : attention_flops_fp32; }
};

// Reads a profile; BadInput naming the file and the key that is missing or
// not a positive number (bf16 rates may be absent: 0, and a bf16 plan then
// refuses the profile).
MachineProfile load_machine_profile(const std::string& path);
// Writes one in the format above (atomically).
void save_machine_profile(const MachineProfile& profile, const std::string& path);

// PROFILE as given to --machine: a path to a .yaml file, or a name looked
// up as configs/machines/NAME.yaml under the working directory and under
// the folder above the loom executable's. BadInput listing where it looked.
std::string resolve_machine_profile(const std::string& name_or_path);

}  // namespace loom::plan
