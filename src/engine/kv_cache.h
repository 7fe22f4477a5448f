// Paged KV cache: per layer one pool of fixed-size blocks [num_blocks, block_size, KV, hd] for K and for V;
// a sequence owns a block table. Blocks are reference-counted so the N samples of a prompt share its prefill.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "models/model_config.h"

namespace rlaif {

class PagedKvCache {
 public:
  PagedKvCache(const ModelConfig& c, int64_t num_blocks, int64_t block_size, at::ScalarType dtype, at::Device device);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return static_cast<int64_t>(refs_.size()); }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  // Flat views [num_blocks * block_size, KV, hd]: row = block * block_size + offset.
  at::Tensor& keys(int layer) { return k_[layer]; }
  at::Tensor& values(int layer) { return v_[layer]; }

  int alloc();              // a fresh block with one reference; CHECKs that one is free
  void retain(int block);   // another sequence shares it
  void release(int block);  // back to the pool at zero references
  int refs(int block) const { return refs_[block]; }
  // Copies one block's K/V rows (every layer) into another: copy-on-write of a shared partial block.
  void copy_block(int from, int to);

 private:
  int64_t block_size_;
  std::vector<at::Tensor> k_, v_;
  std::vector<int> refs_;
  std::vector<int> free_;
};

}  // namespace rlaif
