// RAII ownership of HDF5 ids, the process-wide HDF5 lock, and HDF5 error text.
//
// Only data/*.cpp include this header: it pulls in <hdf5.h>, which nothing
// outside the dataset code needs to see.
#pragma once

#include <hdf5.h>

#include <mutex>
#include <new>
#include <string>
#include <utility>

namespace loom::hdf5 {

// Note [HDF5 lock]: the HDF5 C library keeps global state (open-file table,
// id registry, error stacks, metadata caches). Only a build configured with
// --enable-threadsafe serialises calls itself; Debian's libhdf5 happens to be
// one, conda's and a default source build are not. loom therefore calls
// HDF5 only while holding this one process-wide mutex, whatever the build: the
// loader's prefetch thread and the trainer's validation reads would otherwise
// race inside the library. The mutex is recursive because handle destructors
// take it too, and they often run inside a function that already holds it.
// HDF5 does the I/O itself, so the lock is held for the duration of a read;
// reads are short (one sample) so the prefetch thread never holds it long.
inline std::recursive_mutex& global_mutex() {
  static std::recursive_mutex mutex;
  return mutex;
}

// Fork hooks for run_isolated (util/isolated.h), which reads untrusted files
// in a child process: the lock is held across fork(), so no thread of the
// parent is inside libhdf5 then and the child's copy of the library is in a
// consistent state. The child's copy of the mutex belongs to a thread that
// does not exist there, so the child makes a new one (it never destroys the
// old: the child ends with _exit).
inline void lock_for_fork() { global_mutex().lock(); }
inline void unlock_after_fork() { global_mutex().unlock(); }
inline void renew_lock_in_child() { new (&global_mutex()) std::recursive_mutex(); }

// Holds the HDF5 lock. Also turns off HDF5's automatic printing of error
// stacks to stderr for the calling thread (in a thread-safe build the setting
// is per thread): loom turns failures into exceptions instead.
class Lock {
 public:
  Lock() : lock_(global_mutex()) {
    thread_local bool silenced = false;
    if (!silenced) {
      H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
      silenced = true;
    }
  }

 private:
  std::unique_lock<std::recursive_mutex> lock_;
};

// Owns one HDF5 id and closes it with `Close` (H5Fclose, H5Dclose, ...).
// Move-only; an invalid id (negative) owns nothing.
template <herr_t (*Close)(hid_t)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

  // Closes the id, ignoring errors (destructors, error paths).
  void reset() noexcept {
    if (id_ >= 0) {
      Lock lock;
      Close(id_);
    }
    id_ = H5I_INVALID_HID;
  }
  // Closes the id and reports whether closing succeeded: closing a file that
  // was written flushes it, and that can fail (disk full).
  bool close() {
    if (id_ < 0) return true;
    Lock lock;
    const herr_t status = Close(std::exchange(id_, H5I_INVALID_HID));
    return status >= 0;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
};

using FileId = Handle<H5Fclose>;
using DatasetId = Handle<H5Dclose>;
using SpaceId = Handle<H5Sclose>;
using PlistId = Handle<H5Pclose>;
using AttrId = Handle<H5Aclose>;
using TypeId = Handle<H5Tclose>;
using GroupId = Handle<H5Gclose>;

// The innermost message of the calling thread's HDF5 error stack (the
// library's own reason, e.g. "truncated file: eof = 1024, ..."), then clears
// the stack. Call right after the failing call, with the lock held.
inline std::string take_error_detail() {
  std::string detail;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* err, void* out) -> herr_t {
        if (n == 0 && err != nullptr && err->desc != nullptr) *static_cast<std::string*>(out) = err->desc;
        return 0;
      },
      &detail);
  H5Eclear2(H5E_DEFAULT);
  return detail.empty() ? std::string() : " (HDF5: " + detail + ")";
}

}  // namespace loom::hdf5
