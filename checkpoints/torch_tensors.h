// Bridges between libtorch tensors and the torch-free safetensors layer.
#pragma once

#include <string>

#include <torch/types.h>

#include "checkpoints/safetensors.h"

namespace loom {

safetensors::Dtype to_safetensors_dtype(torch::ScalarType type);
// Throws BadInput naming `context` for dtypes libtorch cannot hold (U16, F8...).
torch::ScalarType to_torch_dtype(safetensors::Dtype dtype, const std::string& context);

// A contiguous CPU copy of the viewed bytes (the mapping may be unaligned and
// goes away with its File, so the tensor owns its memory).
torch::Tensor tensor_from_view(const safetensors::TensorView& view, const std::string& context);

// Describes `tensor` for writing; `tensor` must be contiguous on the CPU and
// outlive the write.
safetensors::TensorToWrite tensor_to_write(const std::string& name, const torch::Tensor& tensor);

// Parses "float32"/"fp32"/"F32", "bfloat16"/"bf16"/"BF16", "float16"/"fp16"/"F16".
torch::ScalarType parse_float_dtype(const std::string& name, const std::string& context);
// "float32", "bfloat16", "float16": the names transformers writes in config.json.
std::string hf_dtype_name(torch::ScalarType type);

}  // namespace loom
