#include "paged_memory.h"

#include <algorithm>
#include <limits>
#include <unordered_set>

namespace lrag {

namespace {

std::string stream_name(int64_t stream) { return "stream " + std::to_string(stream); }

}  // namespace

PagedMemory::PagedMemory(int32_t num_layers, int64_t gpu_slots, int64_t host_slots)
    : num_layers_(num_layers),
      gpu_("GPU tier", 0),
      host_("host tier", 0),
      pages_alloc_("page ids", 0) {
  if (num_layers < 1) {
    throw std::invalid_argument("PagedMemory: num_layers must be >= 1, got " + std::to_string(num_layers));
  }
  if (gpu_slots < 0 || host_slots < 0) {
    throw std::invalid_argument("PagedMemory: slot counts must be >= 0, got gpu_slots=" +
                                std::to_string(gpu_slots) + ", host_slots=" + std::to_string(host_slots));
  }
  grow(gpu_slots, host_slots);
}

// ---- streams ----------------------------------------------------------------------

const PagedMemory::Stream& PagedMemory::stream_ref(int64_t stream, const char* op) const {
  auto it = streams_.find(stream);
  if (it == streams_.end()) {
    throw std::invalid_argument(std::string(op) + ": unknown " + stream_name(stream));
  }
  return it->second;
}

PagedMemory::Stream& PagedMemory::stream_ref(int64_t stream, const char* op) {
  return const_cast<Stream&>(static_cast<const PagedMemory*>(this)->stream_ref(stream, op));
}

int64_t PagedMemory::create_stream() {
  streams_.emplace(next_stream_, Stream{});
  return next_stream_++;
}

int64_t PagedMemory::fork(int64_t parent) {
  Stream child = stream_ref(parent, "fork");
  for (int32_t p : child.pages) ++pages_[p].refcount;
  streams_.emplace(next_stream_, std::move(child));
  return next_stream_++;
}

void PagedMemory::free_stream(int64_t stream) {
  Stream& s = stream_ref(stream, "free_stream");
  for (int32_t p : s.pages) release_page(p);
  streams_.erase(stream);
}

std::vector<int64_t> PagedMemory::stream_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(streams_.size());
  for (const auto& kv : streams_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int64_t PagedMemory::num_frames(int64_t stream) const {
  return static_cast<int64_t>(stream_ref(stream, "num_frames").pages.size()) / num_layers_;
}

// ---- capacity ---------------------------------------------------------------------

int64_t PagedMemory::free_pages() const { return pages_alloc_.available(); }

bool PagedMemory::can_append(const std::vector<int64_t>& streams, int64_t frames) const {
  const int64_t needed = static_cast<int64_t>(streams.size()) * frames * num_layers_;
  return needed <= free_pages() && needed <= gpu_.capacity();
}

void PagedMemory::grow(int64_t gpu_slots, int64_t host_slots) {
  if (gpu_slots < gpu_.capacity() || host_slots < host_.capacity()) {
    throw std::invalid_argument("PagedMemory.grow: tiers cannot shrink (GPU " + std::to_string(gpu_.capacity()) +
                                " -> " + std::to_string(gpu_slots) + ", host " + std::to_string(host_.capacity()) +
                                " -> " + std::to_string(host_slots) + ")");
  }
  gpu_.grow(gpu_slots);
  host_.grow(host_slots);
  // Every live page occupies one slot, so page ids never outnumber the slots.
  pages_alloc_.grow(gpu_slots + host_slots);
  pages_.resize(static_cast<size_t>(gpu_slots + host_slots));
}

// ---- LRU over GPU-resident pages --------------------------------------------------

void PagedMemory::lru_unlink(int32_t page) {
  PageInfo& info = pages_[page];
  if (info.lru_prev >= 0) pages_[info.lru_prev].lru_next = info.lru_next; else lru_head_ = info.lru_next;
  if (info.lru_next >= 0) pages_[info.lru_next].lru_prev = info.lru_prev; else lru_tail_ = info.lru_prev;
  info.lru_prev = info.lru_next = -1;
}

void PagedMemory::lru_push_back(int32_t page) {
  PageInfo& info = pages_[page];
  info.lru_prev = lru_tail_;
  info.lru_next = -1;
  if (lru_tail_ >= 0) pages_[lru_tail_].lru_next = page; else lru_head_ = page;
  lru_tail_ = page;
}

// A free GPU slot, or the slot of the least recently used GPU page, which moves to the
// host. Its host slot comes from the free list first; only when the host tier is full
// does it reuse a slot a load of this plan has just vacated (a swap the caller stages).
int32_t PagedMemory::take_gpu_slot(CopyPlan& plan, std::vector<int32_t>& freed_host) {
  if (gpu_.available() > 0) return gpu_.allocate();
  const int32_t victim = lru_head_;
  if (victim < 0) throw std::logic_error("PagedMemory: GPU tier full but no GPU page to evict");
  int32_t host_slot;
  if (host_.available() > 0) {
    host_slot = host_.allocate();
  } else if (!freed_host.empty()) {
    host_slot = freed_host.back();
    freed_host.pop_back();
  } else {
    throw std::logic_error("PagedMemory: no host slot for an eviction although capacity was checked");
  }
  PageInfo& info = pages_[victim];
  const int32_t gpu_slot = info.slot;
  lru_unlink(victim);
  plan.evict_gpu.push_back(gpu_slot);
  plan.evict_host.push_back(host_slot);
  info.tier = Tier::kHost;
  info.slot = host_slot;
  return gpu_slot;  // stays allocated: handed straight to the caller
}

// ---- append / prefetch / touch / drop ---------------------------------------------

CopyPlan PagedMemory::append(const std::vector<int64_t>& streams, int64_t frames) {
  if (frames < 0) throw std::invalid_argument("append: frames must be >= 0, got " + std::to_string(frames));
  std::unordered_set<int64_t> seen;
  for (int64_t s : streams) {
    stream_ref(s, "append");
    if (!seen.insert(s).second) throw std::invalid_argument("append: " + stream_name(s) + " listed twice");
  }
  const int64_t needed = static_cast<int64_t>(streams.size()) * frames * num_layers_;
  if (needed > gpu_.capacity()) {
    throw CapacityError("append: " + std::to_string(needed) + " new pages must be GPU-resident at once but the "
                        "GPU tier holds " + std::to_string(gpu_.capacity()) + " slots");
  }
  if (needed > free_pages()) {
    throw CapacityError("append: " + std::to_string(needed) + " new pages but only " + std::to_string(free_pages()) +
                        " free (GPU " + std::to_string(gpu_.capacity()) + " + host " +
                        std::to_string(host_.capacity()) + " slots, " + std::to_string(pages_alloc_.used()) +
                        " in use)");
  }
  CopyPlan plan;
  plan.new_gpu.reserve(static_cast<size_t>(needed));
  std::vector<int32_t> no_freed_host;
  for (int64_t s : streams) {
    Stream& st = streams_.at(s);
    for (int64_t i = 0; i < frames * num_layers_; ++i) {
      const int32_t slot = take_gpu_slot(plan, no_freed_host);
      const int32_t p = pages_alloc_.allocate();
      PageInfo& info = pages_[p];
      info.refcount = 1;
      info.tier = Tier::kGpu;
      info.slot = slot;
      lru_push_back(p);
      st.pages.push_back(p);
      plan.new_gpu.push_back(slot);
    }
  }
  return plan;
}

std::vector<int32_t> PagedMemory::place(const std::vector<int64_t>& streams, int64_t frames) {
  if (frames < 0) throw std::invalid_argument("place: frames must be >= 0, got " + std::to_string(frames));
  std::unordered_set<int64_t> seen;
  for (int64_t s : streams) {
    stream_ref(s, "place");
    if (!seen.insert(s).second) throw std::invalid_argument("place: " + stream_name(s) + " listed twice");
  }
  const int64_t available = free_pages();
  const int64_t per_stream = static_cast<int64_t>(streams.size()) * num_layers_;
  // Compared by division first: streams * frames * layers may not fit in int64.
  if (per_stream > 0 && frames > available / per_stream) {
    const std::string needed = frames <= std::numeric_limits<int64_t>::max() / per_stream
                                   ? std::to_string(per_stream * frames)
                                   : std::to_string(streams.size()) + " x " + std::to_string(frames) + " x " +
                                         std::to_string(num_layers_);
    throw CapacityError("place: " + needed + " new pages but only " + std::to_string(available) + " free (GPU " +
                        std::to_string(gpu_.capacity()) + " + host " + std::to_string(host_.capacity()) + " slots, " +
                        std::to_string(pages_alloc_.used()) + " in use)");
  }
  std::vector<int32_t> where;
  where.reserve(static_cast<size_t>(per_stream * frames));
  for (int64_t s : streams) {
    Stream& st = streams_.at(s);
    for (int64_t i = 0; i < frames * num_layers_; ++i) {
      const int32_t p = pages_alloc_.allocate();
      PageInfo& info = pages_[p];
      info.refcount = 1;
      if (gpu_.available() > 0) {
        info.tier = Tier::kGpu;
        info.slot = gpu_.allocate();
        lru_push_back(p);
        where.push_back(info.slot);
      } else {
        info.tier = Tier::kHost;
        info.slot = host_.allocate();
        where.push_back(-1 - info.slot);
      }
      st.pages.push_back(p);
    }
  }
  return where;
}

void PagedMemory::check_frames(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames,
                               const char* op) const {
  if (streams.size() != frames.size()) {
    throw std::invalid_argument(std::string(op) + ": " + std::to_string(streams.size()) + " streams but " +
                                std::to_string(frames.size()) + " frames");
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    const int64_t n = static_cast<int64_t>(stream_ref(streams[i], op).pages.size()) / num_layers_;
    if (frames[i] < 0 || frames[i] >= n) {
      throw std::out_of_range(std::string(op) + ": frame " + std::to_string(frames[i]) + " of " +
                              stream_name(streams[i]) + " out of range [0, " + std::to_string(n) + ")");
    }
  }
}

CopyPlan PagedMemory::prefetch(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames) {
  check_frames(streams, frames, "prefetch");
  std::vector<int32_t> wanted;
  std::unordered_set<int32_t> seen;
  for (size_t i = 0; i < streams.size(); ++i) {
    const Stream& st = streams_.at(streams[i]);
    for (int32_t l = 0; l < num_layers_; ++l) {
      const int32_t p = st.pages[static_cast<size_t>(frames[i] * num_layers_ + l)];
      if (seen.insert(p).second) wanted.push_back(p);
    }
  }
  if (static_cast<int64_t>(wanted.size()) > gpu_.capacity()) {
    throw std::invalid_argument("prefetch: " + std::to_string(wanted.size()) + " distinct pages requested but the "
                                "GPU tier holds " + std::to_string(gpu_.capacity()) + " slots");
  }
  // Resident pages go to the MRU end first so the evictions below never pick them.
  for (int32_t p : wanted) {
    if (pages_[p].tier == Tier::kGpu) {
      lru_unlink(p);
      lru_push_back(p);
    }
  }
  CopyPlan plan;
  std::vector<int32_t> freed_host;
  for (int32_t p : wanted) {
    PageInfo& info = pages_[p];
    if (info.tier == Tier::kGpu) continue;
    const int32_t host_slot = info.slot;
    freed_host.push_back(host_slot);
    const int32_t gpu_slot = take_gpu_slot(plan, freed_host);
    plan.load_host.push_back(host_slot);
    plan.load_gpu.push_back(gpu_slot);
    info.tier = Tier::kGpu;
    info.slot = gpu_slot;
    lru_push_back(p);
  }
  for (int32_t s : freed_host) host_.release(s);
  return plan;
}

void PagedMemory::touch(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames) {
  check_frames(streams, frames, "touch");
  for (size_t i = 0; i < streams.size(); ++i) {
    const Stream& st = streams_.at(streams[i]);
    for (int32_t l = 0; l < num_layers_; ++l) {
      const int32_t p = st.pages[static_cast<size_t>(frames[i] * num_layers_ + l)];
      if (pages_[p].tier == Tier::kGpu) {
        lru_unlink(p);
        lru_push_back(p);
      }
    }
  }
}

void PagedMemory::release_page(int32_t page) {
  PageInfo& info = pages_[page];
  if (--info.refcount > 0) return;
  if (info.tier == Tier::kGpu) {
    lru_unlink(page);
    gpu_.release(info.slot);
  } else {
    host_.release(info.slot);
  }
  info = PageInfo{};
  pages_alloc_.release(page);
}

void PagedMemory::drop_oldest(const std::vector<int64_t>& streams, int64_t count) {
  std::unordered_set<int64_t> seen;
  for (int64_t s : streams) {
    // A stream listed twice would be cut twice, past what was checked.
    if (!seen.insert(s).second) throw std::invalid_argument("drop_oldest: " + stream_name(s) + " listed twice");
    const int64_t n = num_frames(s);
    if (count < 0 || count > n) {
      throw std::out_of_range("drop_oldest: cannot drop " + std::to_string(count) + " frames of " +
                              stream_name(s) + " holding " + std::to_string(n));
    }
  }
  const auto cut = static_cast<std::ptrdiff_t>(count * num_layers_);
  for (int64_t s : streams) {
    Stream& st = streams_.at(s);
    for (auto it = st.pages.begin(); it != st.pages.begin() + cut; ++it) release_page(*it);
    st.pages.erase(st.pages.begin(), st.pages.begin() + cut);
  }
}

void PagedMemory::drop_frames(const std::vector<int64_t>& streams, const std::vector<int64_t>& frames) {
  if (streams.size() != frames.size()) {
    throw std::invalid_argument("drop_frames: " + std::to_string(streams.size()) + " streams but " +
                                std::to_string(frames.size()) + " frames");
  }
  std::unordered_set<int64_t> seen;
  for (size_t i = 0; i < streams.size(); ++i) {
    if (!seen.insert(streams[i]).second) {
      throw std::invalid_argument("drop_frames: " + stream_name(streams[i]) + " listed twice");
    }
    const int64_t n = num_frames(streams[i]);
    if (frames[i] < 0 || frames[i] >= n) {
      throw std::out_of_range("drop_frames: frame " + std::to_string(frames[i]) + " of " +
                              stream_name(streams[i]) + " out of range [0, " + std::to_string(n) + ")");
    }
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    Stream& st = streams_.at(streams[i]);
    const auto first = st.pages.begin() + static_cast<std::ptrdiff_t>(frames[i] * num_layers_);
    for (auto it = first; it != first + num_layers_; ++it) release_page(*it);
    st.pages.erase(first, first + num_layers_);
  }
}

int64_t PagedMemory::frames_to_drop(const std::vector<int64_t>& streams, int64_t pages) const {
  if (pages <= 0) return 0;
  int64_t max_frames = 0;
  for (int64_t s : streams) max_frames = std::max(max_frames, num_frames(s));
  std::unordered_map<int32_t, int32_t> dropped_refs;
  int64_t freed = 0;
  for (int64_t f = 0; f < max_frames; ++f) {
    for (int64_t s : streams) {
      const Stream& st = streams_.at(s);
      if (f * num_layers_ >= static_cast<int64_t>(st.pages.size())) continue;
      for (int32_t l = 0; l < num_layers_; ++l) {
        const int32_t p = st.pages[static_cast<size_t>(f * num_layers_ + l)];
        if (++dropped_refs[p] == pages_[p].refcount) ++freed;
      }
    }
    if (freed >= pages) return f + 1;
  }
  return -1;
}

// ---- lookups ----------------------------------------------------------------------

int32_t PagedMemory::page(int64_t stream, int64_t frame, int32_t layer) const {
  const Stream& st = stream_ref(stream, "page");
  const int64_t n = static_cast<int64_t>(st.pages.size()) / num_layers_;
  if (frame < 0 || frame >= n) {
    throw std::out_of_range("page: frame " + std::to_string(frame) + " of " + stream_name(stream) +
                            " out of range [0, " + std::to_string(n) + ")");
  }
  if (layer < 0 || layer >= num_layers_) {
    throw std::out_of_range("page: layer " + std::to_string(layer) + " out of range [0, " +
                            std::to_string(num_layers_) + ")");
  }
  return st.pages[static_cast<size_t>(frame * num_layers_ + layer)];
}

std::vector<int32_t> PagedMemory::locations(int64_t stream, int64_t frame) const {
  const Stream& st = stream_ref(stream, "locations");
  const int64_t n = static_cast<int64_t>(st.pages.size()) / num_layers_;
  if (frame < 0 || frame >= n) {
    throw std::out_of_range("locations: frame " + std::to_string(frame) + " of " + stream_name(stream) +
                            " out of range [0, " + std::to_string(n) + ")");
  }
  std::vector<int32_t> where;
  where.reserve(static_cast<size_t>(num_layers_));
  for (int32_t l = 0; l < num_layers_; ++l) {
    const PageInfo& info = pages_[st.pages[static_cast<size_t>(frame * num_layers_ + l)]];
    where.push_back(info.tier == Tier::kGpu ? info.slot : -1 - info.slot);
  }
  return where;
}

Tier PagedMemory::tier(int32_t page) const {
  if (page < 0 || page >= static_cast<int32_t>(pages_.size()) || pages_[page].refcount <= 0) {
    throw std::out_of_range("page " + std::to_string(page) + " is not a live page");
  }
  return pages_[page].tier;
}

int32_t PagedMemory::slot(int32_t page) const {
  tier(page);
  return pages_[page].slot;
}

int32_t PagedMemory::refcount(int32_t page) const {
  tier(page);
  return pages_[page].refcount;
}

std::vector<int64_t> PagedMemory::gpu_slot_table(const std::vector<int64_t>& streams, int64_t frames) const {
  if (frames < 0) throw std::invalid_argument("gpu_slot_table: frames must be >= 0, got " + std::to_string(frames));
  std::vector<int64_t> table(streams.size() * static_cast<size_t>(frames * num_layers_), -1);
  for (size_t i = 0; i < streams.size(); ++i) {
    const Stream& st = stream_ref(streams[i], "gpu_slot_table");
    const size_t n = std::min(st.pages.size(), static_cast<size_t>(frames * num_layers_));
    int64_t* row = table.data() + i * static_cast<size_t>(frames * num_layers_);
    for (size_t j = 0; j < n; ++j) {
      const PageInfo& info = pages_[st.pages[j]];
      if (info.tier == Tier::kGpu) row[j] = info.slot;
    }
  }
  return table;
}

bool PagedMemory::all_gpu_resident(const std::vector<int64_t>& streams) const {
  for (int64_t s : streams) {
    for (int32_t p : stream_ref(s, "all_gpu_resident").pages) {
      if (pages_[p].tier != Tier::kGpu) return false;
    }
  }
  return true;
}

Usage PagedMemory::usage() const {
  Usage u;
  u.gpu_capacity = gpu_.capacity();
  u.gpu_used = gpu_.used();
  u.host_capacity = host_.capacity();
  u.host_used = host_.used();
  u.pages_used = pages_alloc_.used();
  for (const PageInfo& info : pages_) {
    if (info.refcount > 1) ++u.shared_pages;
    u.page_references += info.refcount;
  }
  u.num_streams = static_cast<int64_t>(streams_.size());
  return u;
}

// ---- invariants -------------------------------------------------------------------

void PagedMemory::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("PagedMemory invariant broken: " + what); };
  std::vector<int64_t> refs(pages_.size(), 0);
  for (const auto& kv : streams_) {
    if (kv.second.pages.size() % static_cast<size_t>(num_layers_) != 0) {
      fail(stream_name(kv.first) + " holds a partial frame");
    }
    for (int32_t p : kv.second.pages) {
      if (p < 0 || p >= static_cast<int64_t>(pages_.size())) fail(stream_name(kv.first) + " holds bad page id " + std::to_string(p));
      ++refs[p];
    }
  }
  std::vector<int32_t> gpu_owner(static_cast<size_t>(gpu_.capacity()), -1);
  std::vector<int32_t> host_owner(static_cast<size_t>(host_.capacity()), -1);
  int64_t live = 0, on_gpu = 0, on_host = 0;
  for (int32_t p = 0; p < static_cast<int32_t>(pages_.size()); ++p) {
    const PageInfo& info = pages_[p];
    if (info.refcount != refs[p]) {
      fail("page " + std::to_string(p) + " refcount " + std::to_string(info.refcount) + " but " +
           std::to_string(refs[p]) + " page-table entries");
    }
    if (info.refcount == 0) {
      if (pages_alloc_.in_use(p) || info.tier != Tier::kNone) fail("dead page " + std::to_string(p) + " still allocated");
      continue;
    }
    ++live;
    if (!pages_alloc_.in_use(p)) fail("live page " + std::to_string(p) + " not allocated");
    std::vector<int32_t>& owner = info.tier == Tier::kGpu ? gpu_owner : host_owner;
    const SlotAllocator& alloc = info.tier == Tier::kGpu ? gpu_ : host_;
    if (info.tier == Tier::kNone) fail("live page " + std::to_string(p) + " has no tier");
    if (!alloc.in_use(info.slot)) fail("page " + std::to_string(p) + " sits in a free " + alloc.name() + " slot");
    if (owner[info.slot] >= 0) {
      fail(alloc.name() + " slot " + std::to_string(info.slot) + " owned by pages " + std::to_string(owner[info.slot]) +
           " and " + std::to_string(p));
    }
    owner[info.slot] = p;
    (info.tier == Tier::kGpu ? on_gpu : on_host) += 1;
  }
  if (live != pages_alloc_.used()) fail("page id allocator counts " + std::to_string(pages_alloc_.used()) + " but " + std::to_string(live) + " live");
  if (on_gpu != gpu_.used()) fail("GPU tier counts " + std::to_string(gpu_.used()) + " used but " + std::to_string(on_gpu) + " pages there");
  if (on_host != host_.used()) fail("host tier counts " + std::to_string(host_.used()) + " used but " + std::to_string(on_host) + " pages there");
  int64_t in_lru = 0;
  int32_t prev = -1;
  for (int32_t p = lru_head_; p >= 0; p = pages_[p].lru_next) {
    if (++in_lru > on_gpu) fail("LRU list longer than the GPU-resident pages (cycle?)");
    if (pages_[p].tier != Tier::kGpu) fail("LRU list holds page " + std::to_string(p) + " not on the GPU");
    if (pages_[p].lru_prev != prev) fail("LRU back link of page " + std::to_string(p) + " broken");
    prev = p;
  }
  if (prev != lru_tail_) fail("LRU tail mismatch");
  if (in_lru != on_gpu) fail("LRU list holds " + std::to_string(in_lru) + " of " + std::to_string(on_gpu) + " GPU pages");
}

}  // namespace lrag
