#include "util/cuda_part.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace loom {

namespace {

// The folder of the running binary ("" when /proc/self/exe is unreadable).
std::string binary_folder() {
  char path[PATH_MAX];
  const ssize_t length = ::readlink("/proc/self/exe", path, sizeof path - 1);
  if (length <= 0) return "";
  const std::string binary(path, static_cast<size_t>(length));
  const size_t slash = binary.rfind('/');
  return slash == std::string::npos ? "" : binary.substr(0, slash);
}

std::string dl_message() {
  const char* message = ::dlerror();
  return message != nullptr ? message : "no message";
}

struct Part {
  std::once_flag once;
  void* handle = nullptr;
  std::string failure;  // why it did not load, when handle is null
};

Part& part() {
  static Part* instance = new Part;  // never destroyed: the part stays loaded until exit
  return *instance;
}

void load(Part& p) {
  // Linked in already (a test that uses the NCCL group directly).
  p.handle = ::dlopen(kCudaPartFile, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  if (p.handle != nullptr) return;
  std::vector<std::string> beside;
  const std::string folder = binary_folder();
  if (!folder.empty()) {
    beside.push_back(folder + "/" + kCudaPartFile);
    const size_t slash = folder.rfind('/');
    if (slash != std::string::npos && slash > 0) beside.push_back(folder.substr(0, slash) + "/" + kCudaPartFile);
  }
  std::string tried;
  for (const std::string& path : beside) {
    if (::access(path.c_str(), F_OK) != 0) {
      tried += path + ", ";
      continue;
    }
    // A part that exists but fails to load (a missing CUDA library, an
    // unresolved symbol) is the answer: its message says what is wrong.
    // RTLD_GLOBAL: libtorch_cuda and the CUDA libraries it brings are
    // visible to what loads later, as when they were linked in.
    p.handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (p.handle == nullptr) p.failure = "loom's CUDA part " + path + " did not load: " + dl_message();
    return;
  }
  // The library search path (LD_LIBRARY_PATH, the binary's RUNPATH).
  p.handle = ::dlopen(kCudaPartFile, RTLD_NOW | RTLD_GLOBAL);
  if (p.handle != nullptr) return;
  const std::string message = dl_message();
  if (message.find("cannot open shared object file") == std::string::npos) {
    p.failure = std::string("loom's CUDA part ") + kCudaPartFile + " on the library search path did not load: " +
                message;
    return;
  }
  p.failure = std::string("loom's CUDA part (") + kCudaPartFile + ") was not found (tried " + tried +
              "the library search path): this loom was built without CUDA, or the file was not copied beside the "
              "loom binary";
}

}  // namespace

const void* cuda_part_table(const char* entry) {
  Part& p = part();
  std::call_once(p.once, [&] { load(p); });
  if (p.handle == nullptr) throw std::runtime_error(p.failure);
  using Entry = const void* (*)();
  auto* function = reinterpret_cast<Entry>(::dlsym(p.handle, entry));
  if (function == nullptr) {
    throw std::runtime_error(std::string("loom's CUDA part has no entry '") + entry + "' (" + dl_message() +
                             "): it was built from other sources than this binary");
  }
  return function();
}

bool cuda_part_loaded() { return ::dlopen(kCudaPartFile, RTLD_NOW | RTLD_NOLOAD) != nullptr; }

bool nvidia_driver_present() {
  static const bool present = ::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL) != nullptr;
  return present;
}

}  // namespace loom
