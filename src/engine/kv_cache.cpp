// Block pool bookkeeping for the paged KV cache.
#include "engine/kv_cache.h"

#include "core/error.h"

namespace rlaif {

PagedKvCache::PagedKvCache(const ModelConfig& c, int64_t num_blocks, int64_t block_size, at::ScalarType dtype,
                           at::Device device)
    : block_size_(block_size), refs_(num_blocks, 0) {
  RLAIF_CHECK(num_blocks > 0 && block_size > 0, "cache of {} blocks of {}", num_blocks, block_size);
  const auto opt = at::TensorOptions().dtype(dtype).device(device);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    k_.push_back(at::zeros({num_blocks * block_size, c.num_kv_heads, c.head_dim}, opt));
    v_.push_back(at::zeros({num_blocks * block_size, c.num_kv_heads, c.head_dim}, opt));
  }
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int>(b));
}

int PagedKvCache::alloc() {
  RLAIF_CHECK(!free_.empty(), "KV cache out of blocks (the scheduler reserves before admitting)");
  const int b = free_.back();
  free_.pop_back();
  refs_[b] = 1;
  return b;
}

void PagedKvCache::retain(int block) {
  RLAIF_CHECK(refs_[block] > 0, "retain of free block {}", block);
  ++refs_[block];
}

void PagedKvCache::release(int block) {
  RLAIF_CHECK(refs_[block] > 0, "double release of block {}", block);
  if (--refs_[block] == 0) free_.push_back(block);
}

void PagedKvCache::copy_block(int from, int to) {
  for (size_t l = 0; l < k_.size(); ++l) {
    k_[l].narrow(0, to * block_size_, block_size_).copy_(k_[l].narrow(0, from * block_size_, block_size_));
    v_[l].narrow(0, to * block_size_, block_size_).copy_(v_[l].narrow(0, from * block_size_, block_size_));
  }
}

}  // namespace rlaif
