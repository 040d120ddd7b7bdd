// Paged history memory: page allocation, per-stream page tables, reference counts
// and a two-tier (GPU slots / pinned host slots) placement with LRU spill.
//
// Only bookkeeping lives here: no tensors, no CUDA, no Python. Every call that moves
// data returns a CopyPlan the caller executes on its storage (see paged.py).
//
// Vocabulary:
//   page  - logical id of one frame of one layer of one stream (K and V share it);
//           a forked stream shares its parent's pages (refcount > 1). History pages are
//           written once by append and never modified, so sharing needs no copy-on-write.
//   slot  - a row of the GPU pool or of the host pool; a live page occupies one slot
//           in exactly one tier.
#pragma once

#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "slot_allocator.h"

namespace lrag {

// Raised when the pages an operation needs do not fit in both tiers together.
class CapacityError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Tier : int8_t { kNone = 0, kGpu = 1, kHost = 2 };

// Copies the caller must perform, in this order, before using the result:
//   1. evictions: GPU slot evict_gpu[i] -> host slot evict_host[i]
//   2. loads:     host slot load_host[i] -> GPU slot load_gpu[i]
//   3. new pages: write the appended data into GPU slots new_gpu (order stream, frame, layer)
// An eviction may target a host slot that a load of the same plan reads (a swap when
// the host tier is full): the caller then stages the evicted pages before the loads.
struct CopyPlan {
  std::vector<int32_t> evict_gpu, evict_host;
  std::vector<int32_t> load_host, load_gpu;
  std::vector<int32_t> new_gpu;
};

struct Usage {
  int64_t gpu_capacity = 0, gpu_used = 0;
  int64_t host_capacity = 0, host_used = 0;
  int64_t pages_used = 0;     // live logical pages (a shared page counts once)
  int64_t shared_pages = 0;   // live pages with refcount > 1
  int64_t page_references = 0;  // sum of refcounts = page-table entries over all streams
  int64_t num_streams = 0;
};

class PagedMemory {
 public:
  PagedMemory(int32_t num_layers, int64_t gpu_slots, int64_t host_slots);

  int32_t num_layers() const { return num_layers_; }

  // Streams. Ids are never reused.
  int64_t create_stream();
  int64_t fork(int64_t parent);  // child holds the parent's frames, sharing their pages
  void free_stream(int64_t stream);
  bool has_stream(int64_t stream) const { return streams_.count(stream) != 0; }
  std::vector<int64_t> stream_ids() const;  // ascending
  int64_t num_frames(int64_t stream) const;

  // Pages an append of `frames` frames to each of `streams` allocates, and whether both
  // tiers can hold them (nothing is modified).
  int64_t free_pages() const;
  bool can_append(const std::vector<int64_t>& streams, int64_t frames) const;

  // Appends `frames` new frames to every stream in `streams` (distinct ids). New pages are
  // GPU-resident and most recently used; least-recently-retrieved GPU pages spill to the
  // host tier to make room. Throws CapacityError before modifying anything when the pages
  // do not fit.
  CopyPlan append(const std::vector<int64_t>& streams, int64_t frames);

  // Appends `frames` new frames to every stream in `streams` (distinct ids) WITHOUT any
  // migration: each new page takes a free GPU slot when there is one, else a free host
  // slot; no page ever changes tier. GPU-placed pages become most recently used. Returns
  // the location of each new page (order stream, frame, layer): GPU slot s as s (>= 0),
  // host slot h as -1 - h. Throws CapacityError before modifying anything when the pages
  // do not fit in both tiers together.
  std::vector<int32_t> place(const std::vector<int64_t>& streams, int64_t frames);

  // Makes all layers of frames (streams[i], frames[i]) GPU-resident and most recently
  // used, evicting the least recently used other pages to the host tier.
  CopyPlan prefetch(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames);

  // Marks GPU-resident pages of (streams[i], frames[i]) as just retrieved; pages on the
  // host are left alone (a later prefetch brings them back).
  void touch(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames);

  // Forgets the `count` oldest frames of every stream in `streams`.
  void drop_oldest(const std::vector<int64_t>& streams, int64_t count);

  // Forgets frame frames[i] of stream streams[i] (distinct streams, one frame each); the
  // later frames of each stream move down by one.
  void drop_frames(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames);

  // Smallest number of oldest frames to drop from every stream in `streams` so that at
  // least `pages` pages are freed (shared pages free nothing); -1 when impossible.
  int64_t frames_to_drop(const std::vector<int64_t>& streams, int64_t pages) const;

  // Grows the tiers (slot ids stay valid).
  void grow(int64_t gpu_slots, int64_t host_slots);

  // Lookups.
  int32_t page(int64_t stream, int64_t frame, int32_t layer) const;
  // Location of each layer's page of (stream, frame), encoded as place() returns it.
  std::vector<int32_t> locations(int64_t stream, int64_t frame) const;
  Tier tier(int32_t page) const;
  int32_t slot(int32_t page) const;
  int32_t refcount(int32_t page) const;
  // [streams.size(), frames, L] GPU slot of each page, -1 when on the host or past the
  // stream's frames.
  std::vector<int64_t> gpu_slot_table(const std::vector<int64_t>& streams, int64_t frames) const;
  bool all_gpu_resident(const std::vector<int64_t>& streams) const;
  Usage usage() const;

  // Throws std::logic_error describing the first broken invariant.
  void check_invariants() const;

 private:
  struct PageInfo {
    int32_t refcount = 0;
    Tier tier = Tier::kNone;
    int32_t slot = -1;
    int32_t lru_prev = -1, lru_next = -1;  // links among GPU-resident pages only
  };
  struct Stream {
    // frame-major: pages[frame * L + layer]; a deque so that dropping the oldest
    // frames costs the pages dropped, not the pages kept.
    std::deque<int32_t> pages;
  };

  const Stream& stream_ref(int64_t stream, const char* op) const;
  Stream& stream_ref(int64_t stream, const char* op);
  void check_frames(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames,
                    const char* op) const;
  int32_t take_gpu_slot(CopyPlan& plan, std::vector<int32_t>& freed_host);
  void release_page(int32_t page);
  void lru_unlink(int32_t page);
  void lru_push_back(int32_t page);

  int32_t num_layers_;
  SlotAllocator gpu_, host_, pages_alloc_;
  std::vector<PageInfo> pages_;
  std::unordered_map<int64_t, Stream> streams_;
  int64_t next_stream_ = 0;
  int32_t lru_head_ = -1, lru_tail_ = -1;  // head = least recently used
};

}  // namespace lrag
