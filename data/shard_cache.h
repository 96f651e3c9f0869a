// A bounded, least-recently-used cache of open shard files (Note [Open shard
// cache] in data/dataset.cpp). Generic over what an open shard is, so that
// it needs no HDF5 header; Dataset keeps its HDF5 handles in one.
#pragma once

#include <algorithm>
#include <cstddef>
#include <list>
#include <unordered_map>
#include <utility>

namespace loom {

// Not thread-safe: the owner serialises calls (Dataset holds its mutex).
template <typename Shard>
class ShardCache {
 public:
  // capacity 0 is taken as 1: a read needs its shard open.
  explicit ShardCache(size_t capacity) : capacity_(std::max<size_t>(capacity, 1)) {}

  // The open shard `index`, now the most recently used; nullptr when closed.
  Shard* find(size_t index) {
    const auto found = where_.find(index);
    if (found == where_.end()) return nullptr;
    order_.splice(order_.begin(), order_, found->second);
    return &found->second->second;
  }

  // Closes the least recently used shards until one more fits. Called before
  // opening a shard, so that the count of open files never passes capacity,
  // not even while the new one is being opened.
  void make_room() {
    while (order_.size() >= capacity_) {
      where_.erase(order_.back().first);
      order_.pop_back();  // closes its file
    }
  }

  // Keeps `shard` as the most recently used (after make_room()). A reference
  // stays valid until the shard is evicted or erased.
  Shard& insert(size_t index, Shard shard) {
    erase(index);
    make_room();
    order_.emplace_front(index, std::move(shard));
    where_[index] = order_.begin();
    peak_ = std::max(peak_, order_.size());
    return order_.front().second;
  }

  void erase(size_t index) {
    const auto found = where_.find(index);
    if (found == where_.end()) return;
    order_.erase(found->second);
    where_.erase(found);
  }

  size_t size() const { return order_.size(); }
  size_t capacity() const { return capacity_; }
  // The most shards that were open at once.
  size_t peak() const { return peak_; }

 private:
  using Entry = std::pair<size_t, Shard>;
  size_t capacity_;
  std::list<Entry> order_;  // most recently used first
  std::unordered_map<size_t, typename std::list<Entry>::iterator> where_;
  size_t peak_ = 0;
};

}  // namespace loom
