#include "checkpoints/torch_tensors.h"

#include <ATen/ATen.h>

#include <cstring>

#include "util/error.h"

namespace loom {

using safetensors::Dtype;

safetensors::Dtype to_safetensors_dtype(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat: return Dtype::F32;
    case torch::kBFloat16: return Dtype::BF16;
    case torch::kHalf: return Dtype::F16;
    case torch::kDouble: return Dtype::F64;
    case torch::kLong: return Dtype::I64;
    case torch::kInt: return Dtype::I32;
    case torch::kShort: return Dtype::I16;
    case torch::kChar: return Dtype::I8;
    case torch::kByte: return Dtype::U8;
    case torch::kBool: return Dtype::BOOL;
    default: throw std::runtime_error(std::string("no safetensors dtype for ") + c10::toString(type));
  }
}

torch::ScalarType to_torch_dtype(safetensors::Dtype dtype, const std::string& context) {
  switch (dtype) {
    case Dtype::F32: return torch::kFloat;
    case Dtype::BF16: return torch::kBFloat16;
    case Dtype::F16: return torch::kHalf;
    case Dtype::F64: return torch::kDouble;
    case Dtype::I64: return torch::kLong;
    case Dtype::I32: return torch::kInt;
    case Dtype::I16: return torch::kShort;
    case Dtype::I8: return torch::kChar;
    case Dtype::U8: return torch::kByte;
    case Dtype::BOOL: return torch::kBool;
    default:
      throw BadInput(context + ": dtype " + safetensors::dtype_name(dtype) + " is not supported by loom");
  }
}

torch::Tensor tensor_from_view(const safetensors::TensorView& view, const std::string& context) {
  auto type = to_torch_dtype(view.info->dtype, context);
  auto tensor = torch::empty(view.info->shape, torch::TensorOptions().dtype(type));
  if (!view.bytes.empty()) std::memcpy(tensor.data_ptr(), view.bytes.data(), view.bytes.size());
  return tensor;
}

safetensors::TensorToWrite tensor_to_write(const std::string& name, const torch::Tensor& tensor) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.device().is_cpu(), "tensor '", name,
              "' must be contiguous on the CPU to be written");
  safetensors::TensorToWrite out;
  out.name = name;
  out.dtype = to_safetensors_dtype(tensor.scalar_type());
  out.shape = tensor.sizes().vec();
  out.bytes = {static_cast<const std::byte*>(tensor.data_ptr()), tensor.nbytes()};
  return out;
}

torch::ScalarType parse_float_dtype(const std::string& name, const std::string& context) {
  if (name == "float32" || name == "fp32" || name == "F32") return torch::kFloat;
  if (name == "bfloat16" || name == "bf16" || name == "BF16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16" || name == "F16") return torch::kHalf;
  throw BadInput(context + ": unknown dtype '" + name + "' (expected float32, bfloat16 or float16)");
}

std::string hf_dtype_name(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat: return "float32";
    case torch::kBFloat16: return "bfloat16";
    case torch::kHalf: return "float16";
    default: throw std::runtime_error(std::string("no Hugging Face dtype name for ") + c10::toString(type));
  }
}

}  // namespace loom
