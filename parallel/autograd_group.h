// Carrying a process group from an autograd Function's forward to its
// backward: ctx->saved_data holds IValues, and a capsule carries the group
// without registering a TorchScript class. Not owning: the group outlives
// the graph (the model's layers keep it for the whole run).
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "parallel/process_group.h"

namespace loom {

struct GroupRef : torch::CustomClassHolder {
  explicit GroupRef(ProcessGroup* group) : group(group) {}
  ProcessGroup* group;
};

inline void save_group(torch::autograd::AutogradContext* ctx, ProcessGroup& group, const std::string& key = "group") {
  ctx->saved_data[key] = at::IValue::make_capsule(c10::make_intrusive<GroupRef>(&group));
}

inline ProcessGroup& saved_group(torch::autograd::AutogradContext* ctx, const std::string& key = "group") {
  return *c10::static_intrusive_pointer_cast<GroupRef>(ctx->saved_data[key].toCapsule())->group;
}

}  // namespace loom
