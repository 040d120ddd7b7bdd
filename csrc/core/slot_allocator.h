// Fixed-capacity slot allocator with O(1) allocate/release (a LIFO free list).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lrag {

class SlotAllocator {
 public:
  SlotAllocator(std::string name, int64_t capacity);

  // Lowest free slot first on a fresh allocator; throws std::out_of_range when full.
  int32_t allocate();
  // Throws std::invalid_argument naming the slot when it is not allocated.
  void release(int32_t slot);
  // Adds slots [capacity, new_capacity); shrinking is refused.
  void grow(int64_t new_capacity);

  bool in_use(int32_t slot) const;
  int64_t capacity() const { return static_cast<int64_t>(in_use_.size()); }
  int64_t available() const { return static_cast<int64_t>(free_.size()); }
  int64_t used() const { return capacity() - available(); }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::vector<int32_t> free_;    // stack: back() is handed out next
  std::vector<uint8_t> in_use_;  // per slot, guards double release
};

}  // namespace lrag
