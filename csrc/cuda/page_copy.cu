#include "page_copy.cuh"

namespace lrag {

// Why cudaMemcpyAsync rather than a gather kernel: a page is a whole frame of one layer
// (megabytes at Wan shapes), so each copy already saturates the copy engine, the DMA
// engines leave the SMs to the DiT while prefetch overlaps compute, and the slot lists
// are produced on the host by the page tables anyway. Runs of consecutive slots on both
// sides are merged into one copy to keep the call count low for small pages.
cudaError_t copy_pages_async(void* dst, const int32_t* dst_slots, const void* src, const int32_t* src_slots,
                             int64_t count, size_t page_bytes, cudaStream_t stream) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  int64_t i = 0;
  while (i < count) {
    int64_t run = 1;
    while (i + run < count && dst_slots[i + run] == dst_slots[i] + run && src_slots[i + run] == src_slots[i] + run) {
      ++run;
    }
    const cudaError_t err =
        cudaMemcpyAsync(d + static_cast<size_t>(dst_slots[i]) * page_bytes,
                        s + static_cast<size_t>(src_slots[i]) * page_bytes,
                        static_cast<size_t>(run) * page_bytes, cudaMemcpyDefault, stream);
    if (err != cudaSuccess) return err;
    i += run;
  }
  return cudaSuccess;
}

cudaError_t probe_device() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return err;
  return count > 0 ? cudaSuccess : cudaErrorNoDevice;
}

}  // namespace lrag
