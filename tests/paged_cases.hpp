// tests/paged_cases.hpp: paged caches and engine-like traffic for the paged cache's tests (CPU and GPU).
//
// A CacheLayout owns nothing: it says where a cache's four arrays sit in one byte buffer (so that
// host and device copies compare byte for byte, gaps included) and builds the PagedCache for a
// base pointer. Traffic plays an engine: sequences grow by prefill chunks and decode steps, pages
// come from a shuffled free list, and each step yields the slot mapping of its new tokens.
#pragma once

#include <kvq/paged.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace kvq::test {

enum class PoolLayout {
  kNhdPadded,      // [pages, page_size, heads, dim + 8]: 8 bytes after every row stay untouched
  kHnd,            // [pages, heads, page_size, dim]
  kInterleavedNhd  // [pages, 2, page_size, heads, dim]: K and V halves of one pool
};

inline const char* to_string(PoolLayout l) {
  switch (l) {
    case PoolLayout::kNhdPadded: return "nhd_padded";
    case PoolLayout::kHnd: return "hnd";
    default: return "interleaved_nhd";
  }
}

/// kKeysPerChannelPage's extra: sequence ids, sinks and the full-precision element type.
struct ByPage {
  std::int64_t max_seqs = 0;  // 0: the cache is kPerTokenHead
  std::int64_t sink_tokens = 0;
  ElementType type = ElementType::kHalf;
};

struct CacheLayout {
  std::int64_t num_pages, page_size, kv_heads, head_dim;
  PoolLayout layout;
  ByPage by_page;
  PageStrides strides;
  std::int64_t k_codes = 0, v_codes = 0, k_scales = 0, v_scales = 0, bytes = 0;  // offsets in the buffer
  std::int64_t k_open = 0, k_sink = 0, v_sink = 0;

  CacheLayout(std::int64_t pages, std::int64_t ps, std::int64_t heads, std::int64_t dim, PoolLayout l,
              ByPage bp = {})
      : num_pages(pages), page_size(ps), kv_heads(heads), head_dim(dim), layout(l), by_page(bp) {
    const std::int64_t page_codes = ps * heads * dim;
    std::int64_t pool = 0;
    if (l == PoolLayout::kNhdPadded) {
      strides = PageStrides{ps * heads * (dim + 8), heads * (dim + 8), dim + 8};
      pool = pages * strides.page_stride;
      v_codes = pool;
      pool *= 2;
    } else if (l == PoolLayout::kHnd) {
      strides = hnd_strides(ps, heads, dim);
      pool = 2 * pages * page_codes;
      v_codes = pages * page_codes;
    } else {
      strides = PageStrides{2 * page_codes, heads * dim, dim};
      pool = 2 * pages * page_codes;
      v_codes = page_codes;
    }
    k_scales = (pool + 63) / 64 * 64 + 64;  // 64 untouched bytes between codes and scales
    const std::int64_t k_scale_bytes = (bp.max_seqs > 0 ? pages * heads * dim : pages * ps * heads) * 4;
    v_scales = k_scales + k_scale_bytes + 64;
    bytes = v_scales + pages * ps * heads * 4 + 64;
    if (bp.max_seqs > 0) {
      const std::int64_t e = static_cast<std::int64_t>(element_size(bp.type)), row = heads * dim * e;
      k_open = bytes;
      k_sink = k_open + bp.max_seqs * ps * row + 64;
      v_sink = k_sink + bp.max_seqs * bp.sink_tokens * row + 64;
      bytes = v_sink + bp.max_seqs * bp.sink_tokens * row + 64;
    }
  }

  PagedCache cache(std::uint8_t* base) const {
    PagedCache c;
    c.num_pages = num_pages;
    c.page_size = page_size;
    c.kv_heads = kv_heads;
    c.head_dim = head_dim;
    c.k_codes = reinterpret_cast<std::int8_t*>(base + k_codes);
    c.v_codes = reinterpret_cast<std::int8_t*>(base + v_codes);
    c.k_strides = c.v_strides = strides;
    c.k_scales = reinterpret_cast<float*>(base + k_scales);
    c.v_scales = reinterpret_cast<float*>(base + v_scales);
    if (by_page.max_seqs > 0) {
      c.scheme = PagedScheme::kKeysPerChannelPage;
      c.open_type = by_page.type;
      c.max_seqs = by_page.max_seqs;
      c.sink_tokens = by_page.sink_tokens;
      c.k_open = base + k_open;
      c.k_sink = by_page.sink_tokens > 0 ? base + k_sink : nullptr;
      c.v_sink = by_page.sink_tokens > 0 ? base + v_sink : nullptr;
    }
    return c;
  }
  std::string name() const {
    return std::string(to_string(layout)) + " page " + std::to_string(page_size) + " heads " +
           std::to_string(kv_heads) + " dim " + std::to_string(head_dim) +
           (by_page.max_seqs > 0 ? " keys per channel, sinks " + std::to_string(by_page.sink_tokens) : "");
  }
};

constexpr std::uint8_t kCachePoison = 0x5a;  // scales read 1.5e16: never a scale kvq writes here

/// Sequences with block tables, grown step by step from a shuffled free list of pages.
class Traffic {
 public:
  Traffic(int sequences, std::int64_t num_pages, std::int64_t page_size, std::int64_t max_pages_per_seq,
          std::uint64_t seed)
      : page_size_(page_size), max_pages_(max_pages_per_seq), rng_(seed),
        lens_(sequences, 0), table_(sequences * max_pages_per_seq, -1) {
    for (std::int64_t p = 0; p < num_pages; ++p) free_.push_back(static_cast<std::int32_t>(p));
    std::shuffle(free_.begin(), free_.end(), rng_);
  }

  /// Slot mapping of one step: `decode` gives every sequence one token, otherwise a few sequences
  /// get a chunk of up to `max_chunk` tokens. Sequences out of pages stop growing. Some padding
  /// slots (-1) are mixed in.
  std::vector<std::int64_t> step(bool decode, std::int64_t max_chunk) {
    std::vector<std::int64_t> slots;
    seq_ids_.clear();
    positions_.clear();
    const int n = static_cast<int>(lens_.size());
    for (int s = 0; s < n; ++s) {
      if (!decode && rng_() % 3 != 0) continue;
      const std::int64_t want = decode ? 1 : 1 + static_cast<std::int64_t>(rng_() % max_chunk);
      for (std::int64_t i = 0; i < want; ++i) {
        const std::int64_t pos = lens_[s];
        if (pos % page_size_ == 0) {  // a new page
          if (free_.empty() || pos / page_size_ >= max_pages_) break;
          table_[s * max_pages_ + pos / page_size_] = free_.back();
          free_.pop_back();
        }
        slots.push_back(static_cast<std::int64_t>(table_[s * max_pages_ + pos / page_size_]) * page_size_ +
                        pos % page_size_);
        seq_ids_.push_back(s);
        positions_.push_back(static_cast<std::int32_t>(pos));
        ++lens_[s];
      }
      if (rng_() % 4 == 0) {  // padding: its id and position are garbage, the slot says skip
        slots.push_back(-1);
        seq_ids_.push_back(static_cast<std::int32_t>(rng_() % n));
        positions_.push_back(static_cast<std::int32_t>(rng_() % 1000));
      }
    }
    return slots;
  }

  /// The last step's sequence ids and positions, one per slot (kKeysPerChannelPage's append).
  const std::vector<std::int32_t>& seq_ids() const { return seq_ids_; }
  const std::vector<std::int32_t>& positions() const { return positions_; }

  const std::vector<std::int32_t>& lens() const { return lens_; }
  const std::vector<std::int32_t>& table() const { return table_; }
  std::int64_t max_pages() const { return max_pages_; }
  std::int64_t total_tokens() const {
    std::int64_t t = 0;
    for (auto l : lens_) t += l;
    return t;
  }

 private:
  std::int64_t page_size_, max_pages_;
  std::mt19937_64 rng_;
  std::vector<std::int32_t> lens_, table_, free_, seq_ids_, positions_;
};

}  // namespace kvq::test
