// Batched page copies between the GPU pool and the pinned host pool.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace lrag {

// dst[dst_slots[i]] = src[src_slots[i]] for i < count, pages of page_bytes each, enqueued
// on `stream` (no host synchronisation). dst/src are device or pinned host pointers.
cudaError_t copy_pages_async(void* dst, const int32_t* dst_slots, const void* src, const int32_t* src_slots,
                             int64_t count, size_t page_bytes, cudaStream_t stream);

// cudaSuccess when a device is usable by this runtime (driver new enough, device present).
cudaError_t probe_device();

}  // namespace lrag
