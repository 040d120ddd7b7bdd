#include "slot_allocator.h"

#include <limits>
#include <stdexcept>

namespace lrag {

SlotAllocator::SlotAllocator(std::string name, int64_t capacity) : name_(std::move(name)) {
  grow(capacity);
}

int32_t SlotAllocator::allocate() {
  if (free_.empty()) {
    throw std::out_of_range(name_ + ": no free slot (capacity " + std::to_string(capacity()) + ")");
  }
  const int32_t slot = free_.back();
  free_.pop_back();
  in_use_[slot] = 1;
  return slot;
}

void SlotAllocator::release(int32_t slot) {
  if (!in_use(slot)) {
    throw std::invalid_argument(name_ + ": slot " + std::to_string(slot) +
                                " released but not allocated (capacity " + std::to_string(capacity()) + ")");
  }
  in_use_[slot] = 0;
  free_.push_back(slot);
}

void SlotAllocator::grow(int64_t new_capacity) {
  if (new_capacity < capacity()) {
    throw std::invalid_argument(name_ + ": cannot shrink from " + std::to_string(capacity()) + " to " +
                                std::to_string(new_capacity) + " slots");
  }
  if (new_capacity > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument(name_ + ": capacity " + std::to_string(new_capacity) +
                                " exceeds the int32 slot range");
  }
  const int64_t old = capacity();
  in_use_.resize(static_cast<size_t>(new_capacity), 0);
  // Pushed highest first so that the lowest new slot is handed out first.
  for (int64_t s = new_capacity - 1; s >= old; --s) free_.push_back(static_cast<int32_t>(s));
}

bool SlotAllocator::in_use(int32_t slot) const {
  return slot >= 0 && slot < capacity() && in_use_[slot] != 0;
}

}  // namespace lrag
