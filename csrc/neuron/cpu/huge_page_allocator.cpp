#include "huge_page_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastspike {

namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define FASTSPIKE_HAVE_MADV_HUGEPAGE 1
constexpr bool kPlatformHasHugePages = true;
#else
constexpr bool kPlatformHasHugePages = false;
#endif

constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

// At most this many bytes of freed blocks are kept for reuse (see BlockCache).
std::size_t cache_limit_bytes() {
  static const std::size_t limit = [] {
    const char* env = std::getenv("FASTSPIKE_OUTPUT_CACHE_MB");
    if (env == nullptr || *env == '\0') return kDefaultOutputCacheBytes;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
                "FASTSPIKE_OUTPUT_CACHE_MB must be a whole number of megabytes >= 0, got '",
                env, "'");
    return static_cast<std::size_t>(mb) << 20;
  }();
  return limit;
}

// A block of whole huge pages: `length` bytes at `data`, 2 MB aligned.
struct Block {
  void* data;
  std::size_t length;
};

// Freed blocks kept for the next output of the same length. Without it every
// fresh output is new memory from the kernel, faulted in (and zeroed) page by
// page; an inference loop frees each layer's output and asks for one of the same
// size again at once. glibc does the same for its heap but stops at 32 MB, and a
// block here is always mmap-sized. At most cache_limit_bytes() are kept: the
// oldest blocks go back to the system to make room for a newer one, so a process
// whose shapes change keeps the sizes it uses now.
class BlockCache {
 public:
  bool take(std::size_t length, Block* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {  // newest first
      if (it->length == length) {
        *out = *it;
        cached_bytes_ -= length;
        blocks_.erase(std::next(it).base());
        return true;
      }
    }
    return false;
  }

  void keep(const Block& block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block.length > cache_limit_bytes()) {
        evicted.push_back(block);
      } else {
        while (cached_bytes_ + block.length > cache_limit_bytes()) {
          evicted.push_back(blocks_.front());
          cached_bytes_ -= blocks_.front().length;
          blocks_.pop_front();
        }
        blocks_.push_back(block);
        cached_bytes_ += block.length;
      }
    }
    for (const Block& b : evicted) std::free(b.data);  // munmap, outside the lock
  }

  std::size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  std::mutex mutex_;
  std::deque<Block> blocks_;  // oldest first
  std::size_t cached_bytes_ = 0;
};

BlockCache& block_cache() {
  static auto* cache = new BlockCache();  // never destroyed: tensors may outlive statics
  return *cache;
}

// What a tensor's storage holds until it dies: the block and the bytes the
// tensor asked for, so the free can be reported to torch.profiler.
struct Allocation {
  Block block;
  std::size_t nbytes;
};

// Bytes held by live tensors of this allocator: torch.profiler's memory events
// carry a running total per reporting allocator (reserved adds the cache).
std::atomic<std::size_t> g_allocated_bytes{0};

void report_to_profiler(void* data, int64_t delta) {
  const std::size_t total = g_allocated_bytes.load(std::memory_order_relaxed);
  c10::reportMemoryUsageToProfiler(data, delta, total, total + block_cache().cached_bytes(),
                                   c10::Device(c10::DeviceType::CPU));
}

void free_allocation(void* ctx) {
  auto* allocation = static_cast<Allocation*>(ctx);
  g_allocated_bytes.fetch_sub(allocation->nbytes, std::memory_order_relaxed);
  block_cache().keep(allocation->block);
  if (c10::memoryProfilingEnabled()) {
    report_to_profiler(allocation->block.data, -static_cast<int64_t>(allocation->nbytes));
  }
  delete allocation;
}

Block new_block(std::size_t length) {
  void* data = nullptr;
  const int err = posix_memalign(&data, kHugePageBytes, length);
  TORCH_CHECK(err == 0 && data != nullptr, "fastspike: could not allocate ", length,
              " bytes for an operator output (posix_memalign error ", err, ")");
#ifdef FASTSPIKE_HAVE_MADV_HUGEPAGE
  // Advice only: where THP is off ("never") this fails harmlessly and the
  // block is ordinary memory.
  madvise(data, length, MADV_HUGEPAGE);
#endif
  return {data, length};
}

// posix_memalign to a 2 MB boundary, the length rounded up to whole huge pages
// (so the last one lies inside the block), then madvise(MADV_HUGEPAGE): the same
// recipe as PyTorch's THP_MEM_ALLOC_ENABLE path in c10's alloc_cpu, plus the
// BlockCache. Allocations and frees are reported to torch.profiler like the
// default CPU allocator's.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t nbytes) override {
    cache_limit_bytes();  // a bad FASTSPIKE_OUTPUT_CACHE_MB fails here, never in a deleter
    const std::size_t length = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    Block block{};
    if (!block_cache().take(length, &block)) block = new_block(length);
    auto* allocation = new Allocation{block, nbytes};
    g_allocated_bytes.fetch_add(nbytes, std::memory_order_relaxed);
    if (c10::memoryProfilingEnabled()) report_to_profiler(block.data, static_cast<int64_t>(nbytes));
    return {block.data, allocation, &free_allocation, c10::Device(c10::DeviceType::CPU)};
  }

  // The context is an Allocation, not the data pointer: no raw deleter to offer.
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
    const std::size_t nbytes =
        at::detail::computeStorageNbytesContiguous(sizes, c10::elementSize(dtype));
    if (nbytes >= kHugePageOutputMinBytes) {
      return at::detail::empty_generic(sizes, huge_page_allocator(),
                                       c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                       c10::nullopt);
    }
  }
  return at::empty(sizes, options);
}

}  // namespace fastspike
