#pragma once
// Large CPU operator outputs backed by transparent huge pages.
//
// A fresh output of tens of MB costs one page fault per 4 KB page on first
// touch, and on the development VM those faults took longer than the neuron
// math itself (float32, T = 8, N = 2^20: ~20 of ~25 ms). Memory advised for
// transparent huge pages faults once per 2 MB instead. PyTorch does the same
// for every CPU tensor under THP_MEM_ALLOC_ENABLE=1; this applies it to
// fastspike's own large outputs only, so callers get it without a global switch.
// Freed blocks of up to FASTSPIKE_OUTPUT_CACHE_MB (default 64) in all, the newest
// kept, serve the next output of the same size: an inference loop frees each
// layer's output and allocates the same size again, and reused memory does not
// fault.
#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fastspike {

// Outputs at least this large are huge-page backed; smaller ones come from
// PyTorch's CPU allocator (a huge page would be mostly padding).
constexpr std::size_t kHugePageOutputMinBytes = std::size_t{4} << 20;

// Freed huge-page blocks kept for reuse unless FASTSPIKE_OUTPUT_CACHE_MB says
// otherwise (0 turns the cache off).
constexpr std::size_t kDefaultOutputCacheBytes = std::size_t{64} << 20;

// An empty contiguous tensor for an operator output. CPU outputs of
// kHugePageOutputMinBytes or more use memory advised for transparent huge pages
// (Linux; FASTSPIKE_HUGE_PAGES=0 turns it off); everything else is at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether empty_output advises huge pages in this process (FASTSPIKE_HUGE_PAGES
// and platform support); backend_info() reports it.
bool huge_page_outputs_enabled();

}  // namespace fastspike
