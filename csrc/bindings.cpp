// The one Python module of lrag_engine: lrag_engine._C.
// std::invalid_argument -> ValueError and std::out_of_range -> IndexError come from
// pybind11's standard translation; CapacityError gets its own Python class.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "core/paged_memory.h"

#ifdef LRAG_WITH_CUDA
#include "cuda/page_copy.cuh"
#endif

namespace py = pybind11;
using lrag::CopyPlan;
using lrag::PagedMemory;
using lrag::Tier;
using lrag::Usage;

namespace {

#ifdef LRAG_WITH_CUDA
void copy_pages(uintptr_t dst, const std::vector<int32_t>& dst_slots, uintptr_t src,
                const std::vector<int32_t>& src_slots, size_t page_bytes, uintptr_t stream, int device) {
  if (dst_slots.size() != src_slots.size()) {
    throw std::invalid_argument("copy_pages: " + std::to_string(dst_slots.size()) + " destination slots but " +
                                std::to_string(src_slots.size()) + " source slots");
  }
  cudaError_t err;
  {
    py::gil_scoped_release release;
    // This module links its own (static) CUDA runtime: its current device is not torch's.
    err = cudaSetDevice(device);
    if (err == cudaSuccess) err = lrag::copy_pages_async(reinterpret_cast<void*>(dst), dst_slots.data(), reinterpret_cast<const void*>(src),
                                 src_slots.data(), static_cast<int64_t>(dst_slots.size()), page_bytes,
                                 reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) throw std::runtime_error(std::string("copy_pages: ") + cudaGetErrorString(err));
}

std::string cuda_status() {
  const cudaError_t err = lrag::probe_device();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}
#endif

py::dict usage_dict(const Usage& u) {
  py::dict d;
  d["gpu_capacity"] = u.gpu_capacity;
  d["gpu_used"] = u.gpu_used;
  d["host_capacity"] = u.host_capacity;
  d["host_used"] = u.host_used;
  d["pages_used"] = u.pages_used;
  d["shared_pages"] = u.shared_pages;
  d["page_references"] = u.page_references;
  d["num_streams"] = u.num_streams;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lrag_engine paged history memory (page tables, refcounts, two tiers)";
  py::register_exception<lrag::CapacityError>(m, "CapacityError", PyExc_RuntimeError);

  py::enum_<Tier>(m, "Tier").value("NONE", Tier::kNone).value("GPU", Tier::kGpu).value("HOST", Tier::kHost);

  py::class_<CopyPlan>(m, "CopyPlan", "Copies to perform in order: evictions, loads, new-page writes.")
      .def_readonly("evict_gpu", &CopyPlan::evict_gpu)
      .def_readonly("evict_host", &CopyPlan::evict_host)
      .def_readonly("load_host", &CopyPlan::load_host)
      .def_readonly("load_gpu", &CopyPlan::load_gpu)
      .def_readonly("new_gpu", &CopyPlan::new_gpu);

  py::class_<PagedMemory>(m, "PagedMemory")
      .def(py::init<int32_t, int64_t, int64_t>(), py::arg("num_layers"), py::arg("gpu_slots"), py::arg("host_slots"))
      .def_property_readonly("num_layers", &PagedMemory::num_layers)
      .def("create_stream", &PagedMemory::create_stream)
      .def("fork", &PagedMemory::fork, py::arg("parent"))
      .def("free_stream", &PagedMemory::free_stream, py::arg("stream"))
      .def("has_stream", &PagedMemory::has_stream, py::arg("stream"))
      .def("stream_ids", &PagedMemory::stream_ids)
      .def("num_frames", &PagedMemory::num_frames, py::arg("stream"))
      .def("free_pages", &PagedMemory::free_pages)
      .def("can_append", &PagedMemory::can_append, py::arg("streams"), py::arg("frames"))
      .def("append", &PagedMemory::append, py::arg("streams"), py::arg("frames"))
      .def("place", &PagedMemory::place, py::arg("streams"), py::arg("frames"),
           "Appends frames without migration: free GPU slots first, then free host slots. Returns each new "
           "page's location (stream, frame, layer order): GPU slot s as s, host slot h as -1 - h.")
      .def("prefetch", &PagedMemory::prefetch, py::arg("streams"), py::arg("frames"))
      .def("touch", &PagedMemory::touch, py::arg("streams"), py::arg("frames"))
      .def("drop_oldest", &PagedMemory::drop_oldest, py::arg("streams"), py::arg("count"))
      .def("drop_frames", &PagedMemory::drop_frames, py::arg("streams"), py::arg("frames"),
           "Forgets frame frames[i] of stream streams[i] (distinct streams); later frames move down by one.")
      .def("frames_to_drop", &PagedMemory::frames_to_drop, py::arg("streams"), py::arg("pages"))
      .def("grow", &PagedMemory::grow, py::arg("gpu_slots"), py::arg("host_slots"))
      .def("page", &PagedMemory::page, py::arg("stream"), py::arg("frame"), py::arg("layer"))
      .def("locations", &PagedMemory::locations, py::arg("stream"), py::arg("frame"),
           "Location of each layer's page of (stream, frame): GPU slot s as s, host slot h as -1 - h.")
      .def("tier", &PagedMemory::tier, py::arg("page"))
      .def("slot", &PagedMemory::slot, py::arg("page"))
      .def("refcount", &PagedMemory::refcount, py::arg("page"))
      .def(
          "gpu_slot_table",
          [](const PagedMemory& self, const std::vector<int64_t>& streams, int64_t frames) {
            std::vector<int64_t> flat = self.gpu_slot_table(streams, frames);
            py::array_t<int64_t> out({static_cast<py::ssize_t>(streams.size()), static_cast<py::ssize_t>(frames),
                                      static_cast<py::ssize_t>(self.num_layers())});
            std::copy(flat.begin(), flat.end(), out.mutable_data());
            return out;
          },
          py::arg("streams"), py::arg("frames"), "int64 [S, frames, L]: GPU slot per page, -1 if not on the GPU")
      .def("all_gpu_resident", &PagedMemory::all_gpu_resident, py::arg("streams"))
      .def("usage", [](const PagedMemory& self) { return usage_dict(self.usage()); })
      .def("check_invariants", &PagedMemory::check_invariants);

#ifdef LRAG_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("copy_pages", &copy_pages, py::arg("dst"), py::arg("dst_slots"), py::arg("src"), py::arg("src_slots"),
        py::arg("page_bytes"), py::arg("stream"), py::arg("device"),
        "Enqueue dst[dst_slots[i]] = src[src_slots[i]] (raw pointers, page_bytes each) on a CUDA stream.");
  m.def("cuda_status", &cuda_status, "'' when a CUDA device is usable by the extension, else the reason");
#else
  m.attr("with_cuda") = false;
#endif
}
