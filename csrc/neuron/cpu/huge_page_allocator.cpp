#include "huge_page_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastspike {

namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
constexpr bool kPlatformHasHugePages = true;
#else
constexpr bool kPlatformHasHugePages = false;
#endif

constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

// What the allocator hands out, kept until the tensor's storage dies so the
// free can be reported to torch.profiler with its size.
struct Block {
  void* data;
  std::size_t nbytes;
};

// Bytes held by this allocator's blocks: torch.profiler's memory events carry a
// running total per reporting allocator.
std::atomic<std::size_t> g_allocated_bytes{0};

void report_to_profiler(void* data, int64_t delta) {
  const std::size_t total = g_allocated_bytes.load(std::memory_order_relaxed);
  c10::reportMemoryUsageToProfiler(data, delta, total, total, c10::Device(c10::DeviceType::CPU));
}

void free_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  g_allocated_bytes.fetch_sub(block->nbytes, std::memory_order_relaxed);
  if (c10::memoryProfilingEnabled()) report_to_profiler(block->data, -static_cast<int64_t>(block->nbytes));
  std::free(block->data);
  delete block;
}

// posix_memalign to a 2 MB boundary, the length rounded up to whole huge pages
// (so the last one lies inside the block), then madvise(MADV_HUGEPAGE): the same
// recipe as PyTorch's THP_MEM_ALLOC_ENABLE path in c10's alloc_cpu. Allocations
// and frees are reported to torch.profiler like the default CPU allocator's.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t nbytes) override {
    const std::size_t length = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* data = nullptr;
    const int err = posix_memalign(&data, kHugePageBytes, length);
    TORCH_CHECK(err == 0 && data != nullptr, "fastspike: could not allocate ", nbytes,
                " bytes for an operator output (posix_memalign error ", err, ")");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: where THP is off ("never") this fails harmlessly and the
    // block is ordinary memory.
    madvise(data, length, MADV_HUGEPAGE);
#endif
    auto* block = new Block{data, nbytes};
    g_allocated_bytes.fetch_add(nbytes, std::memory_order_relaxed);
    if (c10::memoryProfilingEnabled()) report_to_profiler(data, static_cast<int64_t>(nbytes));
    return {data, block, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  // The context is a Block, not the data pointer: no raw deleter to offer.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator* huge_page_allocator() {
  static auto* allocator = new HugePageAllocator();  // never destroyed: tensors may outlive statics
  return allocator;
}

}  // namespace

bool huge_page_outputs_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("FASTSPIKE_HUGE_PAGES");
    return kPlatformHasHugePages && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return enabled;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu() && huge_page_outputs_enabled()) {
    const auto dtype = c10::typeMetaToScalarType(options.dtype());
    const std::size_t nbytes = at::detail::computeStorageNbytesContiguous(
        sizes, c10::elementSize(dtype));
    if (nbytes >= kHugePageOutputMinBytes) {
      return at::detail::empty_generic(sizes, huge_page_allocator(),
                                       c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                       c10::nullopt);
    }
  }
  return at::empty(sizes, options);
}

}  // namespace fastspike
