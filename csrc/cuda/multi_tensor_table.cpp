// The uploader of the one CUDA metadata table (multi_tensor_table.h) and its LRU cache of
// device copies. Host compiler, ATen headers only.
//
// Why a cache: the tables of a training loop repeat step after step (the same parameters,
// gradients and states at the same addresses), and a hit replaces the pinned staging block and
// the host-to-device copy by a lookup. A hit is exact: the key is every word of the table plus
// the device and the stream, so the cached copy is the table a new upload would make. The key
// holds the stream because a device block is freed in the order of the stream that allocated it:
// a table is only ever read on the stream it was uploaded on, so evicting it cannot free memory
// a pending kernel of another stream still reads.
#include "cuda/multi_tensor_table.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <functional>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "cuda/cuda_api.h"
#include "cuda/cuda_glue.h"

namespace mmmod {
namespace mt {
namespace {

struct Key {
  int64_t device = 0;
  int64_t stream = 0;
  std::vector<int64_t> words;
  bool operator==(const Key& o) const {
    return device == o.device && stream == o.stream && words == o.words;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<int64_t>()(k.device) * 31u + std::hash<int64_t>()(k.stream);
    for (int64_t w : k.words) h = h * 1000003u ^ std::hash<int64_t>()(w);
    return h;
  }
};

class TableCache {
 public:
  // The cached device copy of `key`, marked most recently used; undefined when absent.
  at::Tensor find(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = index_.find(key);
    if (it == index_.end()) return at::Tensor();
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }

  void insert(Key key, const at::Tensor& table) {
    std::lock_guard<std::mutex> lock(mu_);
    if (index_.count(key) != 0) return;
    lru_.emplace_front(std::move(key), table);
    index_.emplace(lru_.front().first, lru_.begin());
    while (lru_.size() > kCacheEntries) {
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }

 private:
  using Item = std::pair<Key, at::Tensor>;
  std::mutex mu_;
  std::list<Item> lru_;
  std::unordered_map<Key, std::list<Item>::iterator, KeyHash> index_;
};

TableCache& cache() {
  static TableCache* c = new TableCache();  // never destroyed: no CUDA frees at process exit
  return *c;
}

}  // namespace

at::Tensor upload_words(const std::vector<int64_t>& words, const at::Device& device, const char* op,
                        const char* capture_hint, Reuse reuse) {
  void* stream = cuda_current_stream(device);
  int capturing = 0;
  const int rc = mmmod_cuda_stream_is_capturing(stream, &capturing);
  TORCH_CHECK(rc == 0, "mmmod.", op, ": CUDA cudaStreamIsCapturing failed: ",
              mmmod_cuda_error_string(rc));
  TORCH_CHECK(!capturing, "mmmod.", op, ": this call uploads its metadata table from pinned host "
              "memory, which cannot be captured in a CUDA graph", capture_hint);
  const bool cached = reuse == Reuse::kCached && words.size() <= kCacheMaxWords;
  Key key;
  if (cached) {
    key.device = device.index();
    key.stream = reinterpret_cast<int64_t>(stream);
    key.words = words;
    at::Tensor hit = cache().find(key);
    if (hit.defined()) return hit;
  }
  at::Tensor host = at::empty({static_cast<int64_t>(words.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr(), words.data(), words.size() * sizeof(int64_t));
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  if (cached) cache().insert(std::move(key), table);
  return table;
}

}  // namespace mt
}  // namespace mmmod
