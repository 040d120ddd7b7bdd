// Randomised self-test of csrc/core for sanitizer builds (ASan + UBSan): runs random
// sequences of append / place / prefetch / touch / fork / free / drop / grow against a model,
// executes every copy plan on simulated tiers and checks placement, contents and the
// invariants after each step, after hand-made place/locations cases with exact expected
// locations. Exit code 0 on success; prints the first failure.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/paged_memory.h"

namespace {

using lrag::CopyPlan;
using lrag::PagedMemory;
using lrag::Tier;

struct Sim {
  std::vector<int64_t> gpu, host;  // one content tag per slot
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

// Staged order: read all evicted pages first, then loads, then write the evictions.
void run_plan(const CopyPlan& plan, Sim& sim) {
  std::vector<int64_t> evicted;
  for (int32_t g : plan.evict_gpu) evicted.push_back(sim.gpu.at(g));
  for (size_t i = 0; i < plan.load_gpu.size(); ++i) sim.gpu.at(plan.load_gpu[i]) = sim.host.at(plan.load_host[i]);
  for (size_t i = 0; i < plan.evict_host.size(); ++i) sim.host.at(plan.evict_host[i]) = evicted[i];
}

void check_contents(const PagedMemory& mem, const std::map<int64_t, std::vector<int64_t>>& model, const Sim& sim) {
  mem.check_invariants();
  for (const auto& kv : model) {
    const int64_t frames = mem.num_frames(kv.first);
    require(frames * mem.num_layers() == static_cast<int64_t>(kv.second.size()), "frame count of a stream");
    for (int64_t f = 0; f < frames; ++f) {
      for (int32_t l = 0; l < mem.num_layers(); ++l) {
        const int32_t p = mem.page(kv.first, f, l);
        const int64_t tag = mem.tier(p) == Tier::kGpu ? sim.gpu.at(mem.slot(p)) : sim.host.at(mem.slot(p));
        require(tag == kv.second[f * mem.num_layers() + l],
                "stream " + std::to_string(kv.first) + " frame " + std::to_string(f) + " layer " + std::to_string(l) +
                    " reads the wrong content");
      }
    }
  }
}

template <class E, class F>
void expect_throw(F&& fn, const char* what) {
  try {
    fn();
  } catch (const E&) {
    return;
  }
  throw std::runtime_error(std::string("expected an exception: ") + what);
}

void run(uint32_t seed, int steps) {
  std::mt19937 rng(seed);
  auto pick = [&](int64_t n) { return static_cast<int64_t>(std::uniform_int_distribution<int64_t>(0, n - 1)(rng)); };
  const int32_t layers = 1 + static_cast<int32_t>(pick(3));
  int64_t gpu_slots = layers * (1 + pick(4)), host_slots = pick(3 * layers + 1);
  PagedMemory mem(layers, gpu_slots, host_slots);
  Sim sim{std::vector<int64_t>(gpu_slots, -1), std::vector<int64_t>(host_slots, -1)};
  std::map<int64_t, std::vector<int64_t>> model;
  int64_t next_tag = 0;
  model[mem.create_stream()];
  for (int step = 0; step < steps; ++step) {
    std::vector<int64_t> ids;
    for (const auto& kv : model) ids.push_back(kv.first);
    const int64_t s = ids[pick(static_cast<int64_t>(ids.size()))];
    switch (pick(9)) {
      case 0:
      case 1: {  // append
        const int64_t frames = 1 + pick(2);
        if (!mem.can_append({s}, frames)) {
          const auto before = mem.usage();
          expect_throw<lrag::CapacityError>([&] { mem.append({s}, frames); }, "append over capacity");
          require(mem.usage().pages_used == before.pages_used, "failed append changed the usage");
          break;
        }
        const CopyPlan plan = mem.append({s}, frames);
        run_plan(plan, sim);
        for (int32_t g : plan.new_gpu) {
          sim.gpu.at(g) = next_tag;
          model[s].push_back(next_tag++);
        }
        break;
      }
      case 2: {  // prefetch a few frames
        const int64_t n = mem.num_frames(s);
        if (n == 0) break;
        std::vector<int64_t> st, fr;
        for (int64_t i = 0, k = 1 + pick(2); i < k; ++i) { st.push_back(s); fr.push_back(pick(n)); }
        if (static_cast<int64_t>(fr.size()) * layers > mem.usage().gpu_capacity) break;
        run_plan(mem.prefetch(st, fr), sim);
        break;
      }
      case 3: {  // touch
        const int64_t n = mem.num_frames(s);
        if (n > 0) mem.touch({s}, {pick(n)});
        break;
      }
      case 4: model[mem.fork(s)] = model[s]; break;
      case 5:
        if (model.size() > 1) { mem.free_stream(s); model.erase(s); }
        break;
      case 6: {  // drop the oldest frames, or one frame anywhere
        const int64_t n = mem.num_frames(s);
        if (n > 0 && pick(2) == 0) {
          const int64_t f = pick(n);
          mem.drop_frames({s}, {f});
          model[s].erase(model[s].begin() + f * layers, model[s].begin() + (f + 1) * layers);
          expect_throw<std::out_of_range>([&] { mem.drop_frames({s}, {n - 1}); }, "drop_frames past the end");
          break;
        }
        const int64_t count = pick(n + 1);
        mem.drop_oldest({s}, count);
        model[s].erase(model[s].begin(), model[s].begin() + count * layers);
        break;
      }
      case 8: {  // place: no migration, GPU slots first, then host slots
        const int64_t frames = 1 + pick(2);
        const auto before = mem.usage();
        if (frames * layers > mem.free_pages()) {
          expect_throw<lrag::CapacityError>([&] { mem.place({s}, frames); }, "place over capacity");
          const auto after = mem.usage();
          require(after.pages_used == before.pages_used && after.gpu_used == before.gpu_used &&
                      after.host_used == before.host_used,
                  "failed place changed the usage");
          break;
        }
        const int64_t old_frames = mem.num_frames(s);
        const std::vector<int32_t> where = mem.place({s}, frames);
        require(static_cast<int64_t>(where.size()) == frames * layers, "place returned the wrong count");
        const int64_t gpu_free = before.gpu_capacity - before.gpu_used;
        for (size_t i = 0; i < where.size(); ++i) {
          require((where[i] >= 0) == (static_cast<int64_t>(i) < gpu_free), "place did not fill the GPU tier first");
          const int32_t loc = where[i];
          (loc >= 0 ? sim.gpu.at(loc) : sim.host.at(-1 - loc)) = next_tag;
          model[s].push_back(next_tag++);
        }
        const auto after = mem.usage();
        require(after.gpu_used - before.gpu_used + after.host_used - before.host_used == frames * layers,
                "place moved pages between tiers");
        for (int64_t f = 0; f < frames; ++f) {
          const std::vector<int32_t> got = mem.locations(s, old_frames + f);
          require(std::equal(got.begin(), got.end(), where.begin() + f * layers), "locations disagree with place");
        }
        break;
      }
      case 7: {  // grow, or probe the error paths
        if (pick(4) == 0) {
          gpu_slots += layers;
          host_slots += pick(2) * layers;
          mem.grow(gpu_slots, host_slots);
          sim.gpu.resize(gpu_slots, -1);
          sim.host.resize(host_slots, -1);
        }
        expect_throw<std::invalid_argument>([&] { mem.append({1000000}, 1); }, "unknown stream");
        expect_throw<std::out_of_range>([&] { mem.page(s, mem.num_frames(s), 0); }, "frame past the end");
        expect_throw<std::out_of_range>([&] { mem.prefetch({s}, {-1}); }, "negative frame");
        expect_throw<std::invalid_argument>([&] { mem.grow(gpu_slots - 1, host_slots); }, "shrinking");
        expect_throw<std::invalid_argument>([&] { mem.place({1000000}, 1); }, "place to an unknown stream");
        expect_throw<std::invalid_argument>([&] { mem.place({s, s}, 1); }, "place to a stream listed twice");
        expect_throw<std::invalid_argument>([&] { mem.place({s}, -1); }, "place of negative frames");
        expect_throw<std::out_of_range>([&] { mem.locations(s, mem.num_frames(s)); }, "locations past the end");
        expect_throw<std::invalid_argument>([&] { mem.locations(1000000, 0); }, "locations of an unknown stream");
        break;
      }
    }
    check_contents(mem, model, sim);
  }
  for (const auto& kv : model) mem.free_stream(kv.first);
  const auto u = mem.usage();
  require(u.pages_used == 0 && u.gpu_used == 0 && u.host_used == 0, "pages leaked after freeing every stream");
  mem.check_invariants();
}

// Hand-made cases of place/locations with exact expected locations.
void place_cases() {
  using V = std::vector<int32_t>;
  PagedMemory mem(2, 3, 4);  // 2 layers, GPU slots 0..2, host slots 0..3
  const int64_t a = mem.create_stream(), b = mem.create_stream();
  require(mem.place({a}, 0).empty(), "place of 0 frames returns nothing");
  // GPU first (lowest slot first), then host slots encoded as -1 - h.
  require(mem.place({a, b}, 1) == V({0, 1, 2, -1}), "place fills GPU slots then host slots");
  require(mem.locations(a, 0) == V({0, 1}) && mem.locations(b, 0) == V({2, -1}), "locations after place");
  mem.check_invariants();
  // 3 free host slots: 2 streams x 1 frame x 2 layers = 4 pages do not fit; nothing changes.
  expect_throw<lrag::CapacityError>([&] { mem.place({a, b}, 1); }, "place over capacity");
  require(mem.usage().pages_used == 4 && mem.num_frames(a) == 1 && mem.num_frames(b) == 1,
          "failed place changed the state");
  expect_throw<lrag::CapacityError>([&] { mem.place({a, b}, std::numeric_limits<int64_t>::max()); },
                                    "place of an int64-overflowing page count");
  // Freed slots are reused last-freed first; pages never move tier.
  mem.drop_oldest({a}, 1);  // frees GPU 0 then GPU 1: GPU 1 is handed out next
  require(mem.place({a}, 1) == V({1, 0}), "freed GPU slots reused LIFO");
  require(mem.place({b}, 1) == V({-2, -3}), "host slots once the GPU tier is full");
  require(mem.locations(b, 1) == V({-2, -3}) && mem.locations(b, 0) == V({2, -1}), "no page moved tier");
  mem.check_invariants();
  mem.grow(4, 4);  // new GPU slot 3 comes first
  mem.free_stream(a);  // GPU 1, GPU 0 released: stack 3, 1, 0 -> 0 is next, then 1, then 3
  require(mem.place({b}, 2) == V({0, 1, 3, -4}), "after grow and free");
  mem.check_invariants();
  expect_throw<std::out_of_range>([&] { mem.locations(b, 4); }, "locations past the end");
  expect_throw<std::out_of_range>([&] { mem.locations(b, -1); }, "locations of a negative frame");
  mem.free_stream(b);
  const auto u = mem.usage();
  require(u.pages_used == 0 && u.gpu_used == 0 && u.host_used == 0, "pages leaked by place");
  mem.check_invariants();
}

}  // namespace

int main(int argc, char** argv) {
  const int seeds = argc > 1 ? std::atoi(argv[1]) : 200;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 200;
  try {
    place_cases();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "place cases: %s\n", e.what());
    return 1;
  }
  for (int seed = 0; seed < seeds; ++seed) {
    try {
      run(static_cast<uint32_t>(seed), steps);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "seed %d: %s\n", seed, e.what());
      return 1;
    }
  }
  std::printf("core selftest: %d seeds x %d steps passed\n", seeds, steps);
  return 0;
}
