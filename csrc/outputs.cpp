// The kernels' outputs: where their memory comes from (a cache of idle blocks, reused without
// page faults) and how the large ones are written (around the cache, with streaming stores).
//
// == The cache ==
// Why: a tensor of 128 KiB or more that glibc serves from a fresh mapping is faulted in page by
// page on first touch, and the kernel zero-fills every page. On a 2-vCPU VM that costs about
// 1.4 us a 4 KiB page, i.e. more than the LayerNorm that writes the tensor: a 12 MiB y (gpt2,
// B=4 T=1024) faults ~3000 times. glibc gives such blocks back to the OS on free (munmap, or a
// heap trim), so a training loop pays again every step. This cache keeps the freed blocks of
// our own outputs and hands them out again, as PyTorch's CUDA caching allocator does on GPUs.
//
// - Blocks are whole pages from mmap; blocks of 2 MiB or more start on a 2 MiB boundary and their
//   whole 2 MiB pages are marked for transparent huge pages: 512x fewer faults on first touch.
//   They are whole 2 MiB pages where rounding up adds at most 1/8 of the request.
// - A request takes the smallest idle block that fits with at most 1/4 slack, else a new one.
// - Idle bytes are capped (BARKGPT_CPU_CACHE_MB, default 1/8 of RAM or of the cgroup's memory
//   limit, 0: no cache,
//   plain at::empty); the least recently freed idle blocks are unmapped to stay within it.
// - Recycled memory is as uninitialized as at::empty's; with torch.use_deterministic_algorithms
//   and fill_uninitialized_memory (the default) it is NaN-filled, as at::empty does.
// - The cache outlives every tensor (never destroyed) and is fork-safe (pthread_atfork).
//
// == Streaming stores ==
// When the tensors an op reads and writes add up to at least the last-level cache, its output is
// written with streaming stores (stream_copy in common.h). It could not stay cached for its
// reader anyway, and a normal store first reads the line it writes (read for ownership) and
// evicts something to hold it, often the op's own inputs. LayerNorm backward at 4096 x 768 fp32
// (dy, x, dx: 36 MiB, L3 32 MiB) went from about 1.07-1.45 ms to 0.86-0.89 ms fwd+bwd; its
// forward (x, y: 24 MiB) is faster with normal stores, which leave y cached for the next op.
//
// == Huge pages for weights ==
// A decode step (generation, one token per row) reads every weight once and little else, so its
// speed is the rate at which the weights stream from memory. With 4 KiB pages that stream also
// walks the page tables: a 2 MiB page covers 512 of them per TLB entry. Kernels on this machine
// (transparent huge pages in "madvise" mode: only advised memory gets them) streamed GPT-2
// small's 494 MB of fp32 weights 10-25% faster from advised 2 MiB-aligned blocks, in the C++
// few-row kernel and in torch alike (benchmarks/results/). hugepage_empty gives such a block;
// barkgpt.ops.use_cpu_hugepages moves a model's large weights into them, which generate does
// on CPU. Blocks are unmapped when their tensor dies (weights are long-lived: no cache).
#include "common.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/version.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <string>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#define BARKGPT_OUTPUT_CACHE 1
#else
#define BARKGPT_OUTPUT_CACHE 0
#endif

namespace barkgpt {
namespace {

#if BARKGPT_OUTPUT_CACHE

constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t(2) << 20;
// Below this glibc serves blocks from its heap, which it does not give back: no faults to save.
constexpr size_t kMinCached = size_t(128) << 10;

// Bytes of memory this process may use: physical RAM, or less under a cgroup limit.
size_t memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  size_t total = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page)
                                       : size_t(8) << 30;
  for (const char* path : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream f(path);
    unsigned long long limit = 0;
    if (f >> limit && limit > 0 && limit < total) total = static_cast<size_t>(limit);
  }
  return total;
}

// What was wrong with BARKGPT_CPU_CACHE_MB, if anything. The cache is made while the library
// loads, where a C++ warning would bypass Python's warnings; barkgpt/_cpp.py warns with this.
std::string g_cache_env_problem;

size_t default_cap() {
  const char* env = std::getenv("BARKGPT_CPU_CACHE_MB");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && errno == 0 && mb >= 0 && mb <= (1LL << 30))
      return static_cast<size_t>(mb) << 20;
    g_cache_env_problem = std::string("barkgpt: ignoring BARKGPT_CPU_CACHE_MB=") + env +
                          " (want a whole number of MiB from 0 to 2^30)";
  }
  return memory_bytes() / 8;
}

// size bytes (a whole number of pages, at least 2 MiB) of fresh anonymous memory starting on a
// 2 MiB boundary, its whole 2 MiB pages advised to be huge pages; nullptr when out of memory.
void* map_huge(size_t size) {
  const int prot = PROT_READ | PROT_WRITE, flags = MAP_PRIVATE | MAP_ANONYMOUS;
  void* raw = mmap(nullptr, size + kHuge, prot, flags, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t a = round_up<uintptr_t>(r, kHuge);
  if (a > r) munmap(raw, a - r);
  const uintptr_t tail = (r + size + kHuge) - (a + size);
  if (tail > 0) munmap(reinterpret_cast<void*>(a + size), tail);
#if defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(a), size / kHuge * kHuge, MADV_HUGEPAGE);  // advice only
#endif
  return reinterpret_cast<void*>(a);
}

struct Block {
  void* ptr;
  size_t size;  // bytes mapped at ptr
  std::list<Block*>::iterator lru;            // position among the idle blocks, oldest first
  std::multimap<size_t, Block*>::iterator by_size;
};

// A c10::Allocator whose allocate(n) is Derived::take(n) (allocate's signature changed in torch 2.3).
template <typename Derived>
class TakeAllocator : public c10::Allocator {
 public:
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  c10::DataPtr allocate(size_t n) override { return static_cast<Derived*>(this)->take(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t n) const override {
    return const_cast<Derived*>(static_cast<const Derived*>(this))->take(n);
  }
#endif
};

class OutputCache final : public TakeAllocator<OutputCache> {
  friend class TakeAllocator<OutputCache>;

 public:
  OutputCache() : cap_(default_cap()) {}

  // The deleter of every block. The context is the data pointer itself (as for at::empty's
  // memory), so copy-on-write clones and anything else that expects get() == get_context()
  // work; blocks_ finds the block.
  static void delete_ptr(void* ptr);

  bool enabled() const { return cap_.load(std::memory_order_relaxed) > 0; }

  // A freed output's block joins the idle set; the oldest idle blocks are unmapped to keep the
  // set within the cap (a block larger than the cap by itself is unmapped at once).
  void give_back(void* ptr) {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = blocks_.find(ptr);
      TORCH_INTERNAL_ASSERT(it != blocks_.end(), "barkgpt: freeing a block the output cache does not own");
      Block* b = it->second;
      if (b->size > cap_) {
        blocks_.erase(it);
        drop.push_back(b);
      } else {
        evict_until(cap_ - b->size, drop);
        b->lru = lru_.insert(lru_.end(), b);
        b->by_size = idle_.emplace(b->size, b);
        idle_bytes_ += b->size;
      }
      if (c10::memoryProfilingEnabled()) {
        size_t unmapping = 0;  // still counted in mapped_bytes_ until unmap() below
        for (Block* d : drop) unmapping += d->size;
        report_locked(ptr, -static_cast<int64_t>(b->size), unmapping);
      }
    }
    for (Block* b : drop) unmap(b);
  }

  void release_idle() { set_cap_and_trim(std::nullopt, 0); }

  void set_cap(size_t cap) { set_cap_and_trim(cap, cap); }

  // [idle bytes, idle blocks, reuses, new mappings, cap bytes, live bytes]
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(idle_.size()),
            static_cast<int64_t>(reuses_), static_cast<int64_t>(maps_), static_cast<int64_t>(cap_.load()),
            static_cast<int64_t>(mapped_bytes_ - idle_bytes_)};
  }

  // Whether ptr is a block of this cache advised for huge pages (whole 2 MiB pages).
  bool advised(const void* ptr) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = blocks_.find(const_cast<void*>(ptr));
    return it != blocks_.end() && it->second->size >= kHuge && it->second->size % kHuge == 0;
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

 private:
  void set_cap_and_trim(std::optional<size_t> cap, size_t keep) {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cap) cap_ = *cap;
      evict_until(keep, drop);
    }
    for (Block* b : drop) unmap(b);
  }

  // Under mu_: moves the oldest idle blocks to `drop` until at most `keep` idle bytes remain.
  void evict_until(size_t keep, std::vector<Block*>& drop) {
    while (idle_bytes_ > keep && !lru_.empty()) {
      Block* b = lru_.front();
      lru_.pop_front();
      idle_.erase(b->by_size);
      idle_bytes_ -= b->size;
      blocks_.erase(b->ptr);
      drop.push_back(b);
    }
  }

  c10::DataPtr take(size_t n) {
    if (n < kMinCached) return c10::GetCPUAllocator()->allocate(n);
    // From 2 MiB up, whole 2 MiB pages where that adds at most 1/8: map_huge advises only whole
    // ones, and a block of 4 KiB pages past the last one leaves the tail (up to 2 MiB - 4 KiB) in
    // small pages, a VMA of its own without MADV_HUGEPAGE (the screened head's 73.6 MiB fp16
    // copy: 1.6 MiB). Where rounding up would add more (a 2.1 MiB output would map 4 MiB, and a
    // huge page is faulted in whole at its first touch), the tail stays in 4 KiB pages.
    const size_t huge = round_up(n, kHuge);
    const size_t want = n >= kHuge && huge - n <= n / 8 ? huge : round_up(n, kPage);
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = idle_.lower_bound(want);
      if (it != idle_.end() && it->first <= want + want / 4) {
        b = it->second;
        idle_.erase(it);
        lru_.erase(b->lru);
          idle_bytes_ -= b->size;
        ++reuses_;
      }
    }
    if (b == nullptr) b = map(want);
    if (c10::memoryProfilingEnabled()) {
      std::lock_guard<std::mutex> g(mu_);
      report_locked(b->ptr, static_cast<int64_t>(b->size));
    }
    return c10::DataPtr(b->ptr, b->ptr, &delete_ptr, c10::Device(c10::DeviceType::CPU));
  }

  // Under mu_: tells torch.profiler(profile_memory=True) that a block became live (delta > 0)
  // or was freed, as the CPU allocator does for at::empty's memory, with the totals after the
  // change. Idle blocks count as reserved, not allocated; `unmapping` bytes are on their way out.
  void report_locked(void* ptr, int64_t delta, size_t unmapping = 0) {
    const size_t mapped = mapped_bytes_ - unmapping;
    c10::reportMemoryUsageToProfiler(ptr, delta, mapped - idle_bytes_, mapped,
                                     c10::Device(c10::DeviceType::CPU));
  }

  Block* map(size_t size) {
    void* p = map_aligned(size);
    if (p == nullptr) {  // out of address space or memory: drop the idle blocks and try once more
      release_idle();
      p = map_aligned(size);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "barkgpt: cannot allocate ", size,
                     " bytes of CPU memory for a kernel output");
    auto* b = new Block{p, size};
    std::lock_guard<std::mutex> g(mu_);
    ++maps_;
    mapped_bytes_ += size;
    blocks_.emplace(p, b);
    return b;
  }

  // size bytes (a whole number of pages) of fresh anonymous memory. From 2 MiB up the block
  // starts on a 2 MiB boundary and its whole 2 MiB pages are advised to be huge pages.
  static void* map_aligned(size_t size) {
    if (size < kHuge) {
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      return p == MAP_FAILED ? nullptr : p;
    }
    return map_huge(size);
  }

  // b is no longer in blocks_ or the idle set.
  void unmap(Block* b) {
    munmap(b->ptr, b->size);
    {
      std::lock_guard<std::mutex> g(mu_);
      mapped_bytes_ -= b->size;
    }
    delete b;
  }

  std::mutex mu_;
  std::unordered_map<void*, Block*> blocks_;  // every mapped block, live or idle
  std::multimap<size_t, Block*> idle_;        // idle blocks by size
  std::list<Block*> lru_;                     // idle blocks, least recently freed first
  size_t idle_bytes_ = 0, mapped_bytes_ = 0;
  std::atomic<size_t> cap_;  // written under mu_; read without it by enabled()
  uint64_t reuses_ = 0, maps_ = 0;
};

// Made when the library is loaded, before any thread can allocate, and never destroyed
// (tensors freed during interpreter shutdown still give their blocks back). Not a static
// made on first use: a child forked while another thread was inside such an initializer
// waits forever on its guard (the fork test caught this, about 1 run in 15).
OutputCache* const g_cache = new OutputCache();

OutputCache& cache() { return *g_cache; }

// A child forked while another thread held the lock would otherwise never get it. Registered
// after g_cache is set, so a handler never sees it unset.
const bool g_fork_handlers_registered =
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); }) == 0;

void OutputCache::delete_ptr(void* ptr) { cache().give_back(ptr); }

// Memory for long-lived tensors, each block its own mapping advised for huge pages (see the top).
class HugePageAllocator final : public TakeAllocator<HugePageAllocator> {
  friend class TakeAllocator<HugePageAllocator>;

 public:
  static void delete_ptr(void* ptr);

  void give_back(void* ptr) {
    size_t size = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = sizes_.find(ptr);
      TORCH_INTERNAL_ASSERT(it != sizes_.end(), "barkgpt: freeing a block the huge-page allocator does not own");
      size = it->second;
      sizes_.erase(it);
      bytes_ -= size;
    }
    munmap(ptr, size);
    if (c10::memoryProfilingEnabled()) report(ptr, -static_cast<int64_t>(size));
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int64_t>(bytes_);
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

 private:
  c10::DataPtr take(size_t n) {
    if (n == 0) return c10::GetCPUAllocator()->allocate(0);
    const size_t size = round_up(n, kHuge);  // whole 2 MiB pages: all of the block is advised
    void* p = map_huge(size);
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "barkgpt: cannot allocate ", size,
                     " bytes of CPU memory for a weight");
    {
      std::lock_guard<std::mutex> g(mu_);
      sizes_.emplace(p, size);
      bytes_ += size;
    }
    if (c10::memoryProfilingEnabled()) report(p, static_cast<int64_t>(size));
    return c10::DataPtr(p, p, &delete_ptr, c10::Device(c10::DeviceType::CPU));
  }

  void report(void* ptr, int64_t delta) {
    const size_t total = static_cast<size_t>(bytes());
    c10::reportMemoryUsageToProfiler(ptr, delta, total, total, c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;
  size_t bytes_ = 0;
};

HugePageAllocator* const g_huge = new HugePageAllocator();  // never destroyed, like g_cache

void HugePageAllocator::delete_ptr(void* ptr) { g_huge->give_back(ptr); }

const bool g_huge_fork_handlers_registered =
    pthread_atfork([] { g_huge->lock(); }, [] { g_huge->unlock(); }, [] { g_huge->unlock(); }) == 0;

#endif  // BARKGPT_OUTPUT_CACHE

// Size of the last-level cache seen by CPU 0: the highest level in sysfs (glibc's sysconf can
// be far off under a hypervisor: 384 MiB for this VM's 32 MiB L3), else sysconf, else 32 MiB.
int64_t last_level_cache_bytes() {
  int64_t best_level = 0, best = 0;
#if defined(__linux__)
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_f(dir + "level"), size_f(dir + "size");
    int64_t level = 0;
    std::string size;
    if (!(level_f >> level) || !(size_f >> size) || size.empty()) continue;
    int64_t mult = 1;
    const char unit = size.back();
    if (unit == 'K') mult = int64_t(1) << 10;
    if (unit == 'M') mult = int64_t(1) << 20;
    if (unit == 'G') mult = int64_t(1) << 30;
    const int64_t bytes = std::atoll(size.c_str()) * mult;
    if (bytes > 0 && level >= best_level) best_level = level, best = bytes;
  }
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE)
  if (best <= 0) best = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return best > 0 ? best : int64_t(32) << 20;
}

int64_t default_stream_min_bytes() { return last_level_cache_bytes(); }

// Set when the library is loaded (reading sysfs), for the same reason as g_cache: a lazily
// initialized static hung a forked child that inherited its guard mid-initialization.
std::atomic<int64_t> g_stream_min_bytes{default_stream_min_bytes()};

std::atomic<int64_t>& stream_min_bytes() { return g_stream_min_bytes; }

}  // namespace

bool stream_output(int64_t op_bytes, int64_t row_bytes) {
#if defined(__SSE2__) || defined(__AVX__)
  // A row shorter than a few cache lines has few whole aligned lines to stream.
  return row_bytes >= kStreamMinRowBytes && op_bytes >= stream_min_bytes().load(std::memory_order_relaxed);
#else
  (void)op_bytes, (void)row_bytes;
  return false;  // no streaming stores on this target: stream_copy would be a byte loop
#endif
}

int64_t output_stream_set_min_bytes(int64_t bytes) {
  return stream_min_bytes().exchange(bytes < 0 ? default_stream_min_bytes() : bytes);
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if BARKGPT_OUTPUT_CACHE
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
  if (nbytes >= kMinCached && options.device().is_cpu() && cache().enabled()) {
    at::Tensor t = at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             options.dtype().toScalarType(), std::nullopt);
    auto& ctx = at::globalContext();
    if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() &&
        t.is_floating_point())
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    return t;
  }
#endif
  return at::empty(sizes, options);
}

// For tests: an uninitialized fp32 output as the kernels get one.
at::Tensor output_empty(at::IntArrayRef sizes) { return empty_output(sizes, at::TensorOptions().dtype(at::kFloat)); }

std::vector<int64_t> output_cache_info() {
#if BARKGPT_OUTPUT_CACHE
  return cache().info();
#else
  return {0, 0, 0, 0, 0, 0};
#endif
}

std::string output_cache_env_problem() {
#if BARKGPT_OUTPUT_CACHE
  return g_cache_env_problem;
#else
  return "";
#endif
}

void output_cache_release() {
#if BARKGPT_OUTPUT_CACHE
  cache().release_idle();
#endif
}

void output_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "cache limit must be >= 0 bytes, got ", bytes);
#if BARKGPT_OUTPUT_CACHE
  cache().set_cap(static_cast<size_t>(bytes));
#endif
}


// The kernel's transparent-huge-page mode ("always", "madvise" or "never"; "" where unknown, and
// on systems without them).
std::string hugepage_mode() {
#if defined(__linux__)
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string word;
  while (f >> word)
    if (word.size() > 2 && word.front() == '[' && word.back() == ']') return word.substr(1, word.size() - 2);
#endif
  return "";
}

at::Tensor hugepage_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
#if BARKGPT_OUTPUT_CACHE
  return at::detail::empty_generic(sizes, g_huge, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
#else
  return at::empty(sizes, at::TensorOptions().dtype(dtype));
#endif
}

// Whether t's memory is a block barkgpt advised for huge pages as a whole: hugepage_empty's, or
// an output-cache block of 2 MiB or more (empty_output, e.g. the screened head's copy).
bool is_hugepage_backed(const at::Tensor& t) {
#if BARKGPT_OUTPUT_CACHE
  if (!t.defined() || !t.device().is_cpu() || !t.has_storage()) return false;
  const c10::DataPtr& dp = t.storage().data_ptr();
  if (dp.get_deleter() == &HugePageAllocator::delete_ptr) return true;
  return dp.get_deleter() == &OutputCache::delete_ptr && cache().advised(dp.get());
#else
  (void)t;
  return false;
#endif
}

int64_t hugepage_bytes() {
#if BARKGPT_OUTPUT_CACHE
  return g_huge->bytes();
#else
  return 0;
#endif
}

}  // namespace barkgpt
