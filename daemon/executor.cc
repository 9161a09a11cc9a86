#include "daemon/executor.h"

#include <cublas_v2.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <time.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <deque>
#include <future>
#include <vector>

#include "daemon/epilogue_fatbin.h"  // generated: stmux_epilogue_fatbin
#include "daemon/epilogue_params.h"
#include "daemon/launch_graphs.h"
#include "daemon/launch_plan.h"
#include "daemon/mapping_cache.h"
#include "daemon/waker.h"
#include "stmux/cublas_wire.h"
#include "stmux/gemm.h"
#include "stmux/log.h"
#include "stmux/no_device.h"
#include "stmux/segment.h"

namespace stmux::daemon {

namespace {

std::string cudaError(cudaError_t error) {
  return fmt::format("{} ({})", cudaGetErrorString(error), cudaGetErrorName(error));
}

#define STMUX_CUDA(call)                                                                    \
  do {                                                                                      \
    const cudaError_t stmux_err_ = (call);                                                  \
    if (stmux_err_ != cudaSuccess) {                                                        \
      return Status::error(fmt::format("{} failed at {}:{}: {}", #call, __FILE__, __LINE__, \
                                       cudaError(stmux_err_)));                             \
    }                                                                                       \
  } while (0)

#define STMUX_CUBLAS(call)                                                                  \
  do {                                                                                      \
    const cublasStatus_t stmux_st_ = (call);                                                \
    if (stmux_st_ != CUBLAS_STATUS_SUCCESS) {                                               \
      return Status::error(fmt::format("{} failed at {}:{}: {}", #call, __FILE__, __LINE__, \
                                       cublasGetStatusString(stmux_st_)));                  \
    }                                                                                       \
  } while (0)

}  // namespace

Result<std::vector<GpuInfo>> listGpus() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    return Status::error(fmt::format("no usable CUDA device or driver: {}", noDeviceReason(error)));
  }
  std::vector<GpuInfo> gpus;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    STMUX_CUDA(cudaGetDeviceProperties(&prop, i));
    GpuInfo gpu;
    gpu.index = i;
    std::memcpy(gpu.uuid.bytes, prop.uuid.bytes, sizeof(gpu.uuid.bytes));
    gpu.name = prop.name;
    int mps = 0;
    STMUX_CUDA(cudaDeviceGetAttribute(&mps, cudaDevAttrMpsEnabled, i));
    gpu.mps = mps != 0;
    gpus.push_back(std::move(gpu));
  }
  if (gpus.empty()) return Status::error("no CUDA device");
  return gpus;
}

class Executor::Impl {
 public:
  Impl(ExecutorOptions options, ExecutorChannel& channel) : options_(options), channel_(channel) {}

  Status start() {
    std::promise<Status> ready;
    auto started = ready.get_future();
    thread_ = std::thread([this, &ready] {
      nameThisThread(fmt::format("stmux-exec{}", options_.device));
      Status status = init();
      const bool ok = status.ok();
      ready.set_value(std::move(status));
      if (ok) {
        mapper_ = std::thread([this] {
          nameThisThread(fmt::format("stmux-map{}", options_.device));
          runMapper();
        });
        wakers_ = std::make_unique<Wakers>(
            WakerOptions{.threads = options_.wakers,
                         .spin_ns = options_.spin_ns,
                         .name = fmt::format("stmux-wake{}", options_.device)},
            channel_.gauges());
        run();
        wakers_.reset();  // every caller woken
        mapper_stop_.store(true, std::memory_order_release);
        channel_.wakeMapper();
        mapper_.join();
      }
      teardown();
    });
    Status status = started.get();
    if (!status.ok()) {
      thread_.join();
      channel_.markBroken();
    }
    return status;
  }

  void stop() {
    stop_.store(true, std::memory_order_release);
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Buffer {
    const float** host = nullptr;             // pinned: [A... | B... | C...] for one batch
    const float** device = nullptr;           // what cuBLAS reads
    EpilogueItem* epilogue_host = nullptr;    // pinned: a request with an epilogue each
    EpilogueItem* epilogue_device = nullptr;  // what the epilogue kernel reads
    cudaEvent_t done = nullptr;
  };
  struct InFlight {
    std::unique_ptr<Batch> batch;
    std::vector<std::int32_t> status;  // per item; kNoWrite: leave the slot alone
    std::size_t buffer = 0;
  };
  struct Ready {
    std::size_t item;  // index into the batch
    const float* a;
    const float* b;
    float* c;
    std::int64_t count;  // problems: a strided batch's, else 1
    std::int64_t stride_a, stride_b, stride_c;
    const float* bias;       // read only with kEpilogueBias
    std::uint32_t epilogue;  // kEpilogue* bits: applied after the GEMM (launchEpilogues)
  };
  using Group = LaunchGroup;

  // The batched and grouped kernels read their pointers from device memory,
  // where cuBLAS cannot look at them before choosing a kernel, and some of
  // those kernels load 16 bytes at a time: operands at a 4-byte offset made
  // the GPU fail a batch with cudaErrorMisalignedAddress (seen on the H200 by
  // the differential suite), which is sticky and cost the daemon its GPU.
  // cublasSgemm sees its pointers and picks a kernel that fits them.
  static constexpr std::uintptr_t kBatchAlignment = 16;
  static bool batchable(const Ready& r) {
    const auto misaligned = [](const void* p) {
      return (reinterpret_cast<std::uintptr_t>(p) % kBatchAlignment) != 0;
    };
    // Each problem of a strided batch is its own pointer in the arrays.
    const auto uneven = [&r](std::int64_t stride) {
      return r.count > 1 && (static_cast<std::uint64_t>(stride) * sizeof(float)) % kBatchAlignment;
    };
    return !misaligned(r.a) && !misaligned(r.b) && !misaligned(r.c) && !uneven(r.stride_a) &&
           !uneven(r.stride_b) && !uneven(r.stride_c);
  }

  Status init() {
    STMUX_CUDA(cudaSetDevice(options_.device));
    STMUX_CUDA(cudaFree(nullptr));  // create the primary context now, not mid-batch
    STMUX_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    STMUX_CUBLAS(cublasCreate(&handle_));
    STMUX_CUBLAS(cublasSetStream(handle_, stream_));
    STMUX_CUBLAS(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST));
    STMUX_CUDA(cudaMalloc(&scratch_, 256));
    const std::size_t pointers = 3 * std::size_t{options_.max_batch};
    buffers_.resize(std::max<std::uint32_t>(options_.max_in_flight, 1));
    // The GPU reads the arrays from device memory, copied ahead of each
    // batch: measured faster than letting it read them from mapped host
    // memory (docs/BENCHMARKS.md).
    for (Buffer& buffer : buffers_) {
      STMUX_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&buffer.host), pointers * sizeof(float*),
                               cudaHostAllocDefault));
      STMUX_CUDA(cudaMalloc(reinterpret_cast<void**>(&buffer.device), pointers * sizeof(float*)));
      STMUX_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&buffer.epilogue_host),
                               options_.max_batch * sizeof(EpilogueItem), cudaHostAllocDefault));
      STMUX_CUDA(cudaMalloc(reinterpret_cast<void**>(&buffer.epilogue_device),
                            options_.max_batch * sizeof(EpilogueItem)));
      STMUX_CUDA(cudaEventCreateWithFlags(&buffer.done, cudaEventDisableTiming));
    }
    STMUX_CUDA(cudaLibraryLoadData(&epilogue_library_, stmux_epilogue_fatbin, nullptr, nullptr, 0,
                                   nullptr, nullptr, 0));
    STMUX_CUDA(cudaLibraryGetKernel(&epilogue_kernel_, epilogue_library_, "stmux_epilogue"));
    STMUX_CUDA(
        cudaLibraryGetKernel(&epilogue_inline_kernel_, epilogue_library_, "stmux_epilogue_inline"));
    // The attributes are those of the code loaded for this GPU: asking for
    // them loads it now rather than at the first epilogue (lazy loading), and
    // a fat binary with nothing this GPU runs fails here, at start.
    for (cudaKernel_t kernel : {epilogue_kernel_, epilogue_inline_kernel_}) {
      cudaFuncAttributes attributes{};
      STMUX_CUDA(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)));
    }
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    // At the version its type was declared for (see shim/driver.h).
    STMUX_CUDA(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 3020,
                                                cudaEnableDefault, &found));
    if (fn == nullptr || found != cudaDriverEntryPointSuccess) {
      return Status::error("the driver has no cuMemGetAddressRange");
    }
    get_address_range_ = reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(fn);
    cache_ = std::make_unique<MappingCache>(
        options_.max_mappings,
        [this](const IpcHandle& h, bool& already_mapped) {
          // Only what the mapper could not open (or what was closed since).
          channel_.gauges().inline_opens.fetch_add(1, std::memory_order_relaxed);
          return openHandle(h, already_mapped);
        },
        [](const Mapped& m) { closeMapping(m); },
        [this](std::uint32_t client, std::uint64_t alloc_id) {
          channel_.gaveUp(client, alloc_id);
        });
    if (options_.launch_graphs) {
      // Enough for every batch size of a few shapes in each buffer.
      constexpr std::size_t kGraphs = 512;
      graphs_ = std::make_unique<LaunchGraphs<BatchGraph>>(
          kGraphs, 2, [](BatchGraph& graph) { cudaGraphExecDestroy(graph.exec); });
    }
    STMUX_INFO(kExec, "GPU {}: ready ({} requests per batch, {} batches in flight{})",
               options_.device, options_.max_batch, buffers_.size(),
               graphs_ ? ", recurring batches replayed as graphs" : "");
    return Status::okStatus();
  }

  void teardown() {
    graphs_.reset();
    cache_.reset();  // closes every mapping
    for (Buffer& buffer : buffers_) {
      if (buffer.host != nullptr) cudaFreeHost(buffer.host);
      if (buffer.device != nullptr) cudaFree(buffer.device);
      if (buffer.epilogue_host != nullptr) cudaFreeHost(buffer.epilogue_host);
      if (buffer.epilogue_device != nullptr) cudaFree(buffer.epilogue_device);
      if (buffer.done != nullptr) cudaEventDestroy(buffer.done);
    }
    if (epilogue_library_ != nullptr) cudaLibraryUnload(epilogue_library_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (handle_ != nullptr) cublasDestroy(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  Result<Mapped> openHandle(const IpcHandle& bytes, bool& already_mapped) {
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, bytes.bytes, sizeof(handle));
    void* ptr = nullptr;
    const cudaError_t error = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess);
    if (error != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: clear it so it is not reported later
      already_mapped = error == cudaErrorAlreadyMapped;
      return Status::error(fmt::format("cudaIpcOpenMemHandle: {}", cudaError(error)));
    }
    // The real size, from the driver: the client's claim is never trusted.
    CUdeviceptr base = 0;
    size_t size = 0;
    const CUresult result = get_address_range_(&base, &size, reinterpret_cast<CUdeviceptr>(ptr));
    if (result != CUDA_SUCCESS || reinterpret_cast<CUdeviceptr>(ptr) < base) {
      cudaIpcCloseMemHandle(ptr);
      return Status::error(
          fmt::format("cuMemGetAddressRange on a mapping failed ({})", static_cast<int>(result)));
    }
    const std::uint64_t start = reinterpret_cast<std::uint64_t>(ptr);
    return Mapped{start, base + size - start};
  }

  // The mapper thread: opens client allocations for the scheduler, so that
  // an open (a fresh allocation, a churning tenant, a garbage handle) never
  // holds up this GPU's batches, which the executor's thread launches.
  void runMapper() {
    const cudaError_t error = cudaSetDevice(options_.device);
    while (!mapper_stop_.load(std::memory_order_acquire)) {
      std::unique_ptr<OpenJob> job = channel_.takeOpen();
      if (!job) {
        channel_.sleepMapper(10'000'000);  // bounded, so a stop is noticed
        continue;
      }
      if (error != cudaSuccess) {
        job->error = fmt::format("cudaSetDevice on the mapper thread: {}", cudaError(error));
      } else {
        open(*job);
      }
      channel_.finishOpen(std::move(job));
    }
  }

  void open(OpenJob& job) {
    // CUDA will not open memory at an address still mapped here. Where the
    // client's freed allocation there is mapped, the scheduler has had the
    // executor close it, which it does at its next command or once no batch
    // in flight uses it: try again for a while (1.6 ms in all), then leave
    // the open to the executor, which closes what is in the way.
    std::uint64_t pause_ns = 25'000;
    for (int attempt = 0;; ++attempt) {
      bool already_mapped = false;
      auto opened = openHandle(job.operand.handle, already_mapped);
      if (opened) {
        job.ok = true;
        job.mapped = opened.value();
        return;
      }
      if (!already_mapped || attempt == 6 || mapper_stop_.load(std::memory_order_acquire)) {
        job.already_mapped = already_mapped;
        job.error = opened.message();
        return;
      }
      timespec ts{0, static_cast<long>(pause_ns)};
      ::nanosleep(&ts, nullptr);
      pause_ns *= 2;
    }
  }

  static void closeMapping(const Mapped& mapped) {
    const cudaError_t error = cudaIpcCloseMemHandle(reinterpret_cast<void*>(mapped.base));
    if (error != cudaSuccess) {
      STMUX_WARN(kMem, "cudaIpcCloseMemHandle: {}", cudaError(error));
      // Not left for the next cuBLAS call of a batch to take for its own.
      (void)cudaGetLastError();
    }
  }

  void run() {
    std::uint64_t last_work = nowNs();
    while (true) {
      bool progressed = false;
      if (in_flight_.size() < buffers_.size()) {
        if (std::unique_ptr<ExecCommand> command = channel_.takeCommand()) {
          handle(std::move(command));
          progressed = true;
        }
      }
      progressed |= pollFront();
      const std::uint64_t now = nowNs();
      if (progressed) {
        last_work = now;
        continue;
      }
      if (stop_.load(std::memory_order_acquire) && in_flight_.empty()) break;
      if (now - last_work < options_.spin_ns) {
        cpuRelax();
      } else if (!in_flight_.empty()) {
        // A long batch: look every 20 us instead of spinning a core on it.
        timespec ts{0, 20'000};
        ::nanosleep(&ts, nullptr);
      } else {
        channel_.sleep(10'000'000);  // bounded, so stop() is noticed
      }
    }
  }

  void handle(std::unique_ptr<ExecCommand> command) {
    switch (command->kind) {
      case ExecCommand::Kind::kRun:
        return launch(std::move(command->batch));
      case ExecCommand::Kind::kAdopt:
        if (!cache_->adopt(command->client_id, command->operand, command->mapped)) {
          closeMapping(command->mapped);
        }
        break;
      case ExecCommand::Kind::kClose:
        closeMapping(command->mapped);
        break;
      case ExecCommand::Kind::kRelease:
        for (std::uint64_t id : command->alloc_ids)
          cache_->release(command->client_id, id);
        break;
      case ExecCommand::Kind::kForget:
        cache_->forgetClient(command->client_id);
        break;
    }
    channel_.gauges().mapped.store(cache_->size(), std::memory_order_relaxed);
  }

  // Maps one operand; `extent` 0 means it is never touched.
  std::int32_t resolve(const Queued& item, const OperandDesc& operand, std::uint64_t extent,
                       std::uint64_t batch_id, std::uint64_t& address) {
    if (extent == 0) {
      address = reinterpret_cast<std::uint64_t>(scratch_);
      return kStatusSuccess;
    }
    auto mapped = cache_->acquire(item.client->id, operand, batch_id);
    if (!mapped) {
      if (std::uint64_t held = 0; map_log_.allow(nowNs(), held)) {
        STMUX_WARN(kMem, "client {} (pid {}): cannot map allocation {}: {}{}", item.client->id,
                   item.client->pid, operand.alloc_id, mapped.message(),
                   held == 0 ? "" : fmt::format(" ({} more such failures not logged)", held));
      }
      return kStatusDeclined;
    }
    if (!operandFits(operand.offset, extent, mapped->bytes)) {
      // Not the daemon's to touch; run in its caller, as it would be
      // without stmux.
      STMUX_DEBUG(kExec, "client {}: operand at offset {} spans {} bytes of a {}-byte allocation",
                  item.client->id, operand.offset, extent, mapped->bytes);
      return kStatusDeclined;
    }
    address = mapped->base + operand.offset;
    return kStatusSuccess;
  }

  void launch(std::unique_ptr<Batch> batch) {
    batch->taken_ns = nowNs();
    const std::size_t count = batch->items.size();
    InFlight flight;
    flight.status.assign(count, kNoWrite);
    if (channel_.gauges().broken.load(std::memory_order_relaxed)) {
      // This GPU is lost to the daemon: decline, and the shims run these
      // themselves.
      for (Queued& item : batch->items) {
        markAnswered(item);
        requestComplete(item.client->view, item.request, kStatusDeclined);
      }
      channel_.finish(std::move(batch));
      return;
    }

    std::vector<Ready> ready;
    ready.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      Queued& item = batch->items[i];
      const Request& r = item.request;
      if (item.client->gone.load(std::memory_order_acquire)) continue;
      // Its caller gave up on it (its claim below would fail): nothing is
      // mapped for it, as its memory may be freed, and released, by now.
      if (!slotPending(item.client->view.slot(r.slot), r.generation)) continue;
      const GemmShape shape = GemmShape::of(r);
      const auto extents = gemmExtents(shape);  // validated by the scheduler
      std::uint64_t a = 0, b = 0, c = 0, bias = 0;
      std::int32_t status = resolve(item, r.a, extents->a, batch->id, a);
      if (status == kStatusSuccess) status = resolve(item, r.b, extents->b, batch->id, b);
      if (status == kStatusSuccess) status = resolve(item, r.c, extents->c, batch->id, c);
      if (status == kStatusSuccess) status = resolve(item, r.bias, extents->bias, batch->id, bias);
      if (status != kStatusSuccess) {
        markAnswered(item);
        requestComplete(item.client->view, r, status);  // never claimed: C untouched
        continue;
      }
      // The caller cancelled.
      if (!slotClaim(item.client->view.slot(r.slot), r.generation)) continue;
      flight.status[i] = kStatusSuccess;
      // An operand never touched points at the scratch buffer, for every problem.
      const auto stride = [](std::uint64_t extent, std::int64_t s) { return extent == 0 ? 0 : s; };
      ready.push_back(Ready{i, reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b),
                            reinterpret_cast<float*>(c), shape.count,
                            stride(extents->a, shape.stride_a), stride(extents->b, shape.stride_b),
                            stride(extents->c, shape.stride_c),
                            reinterpret_cast<const float*>(bias), shape.epilogue});
    }
    channel_.gauges().mapped.store(cache_->size(), std::memory_order_relaxed);

    std::vector<PlanItem> items;
    items.reserve(ready.size());
    for (const Ready& r : ready) {
      items.push_back(PlanItem{batch->items[r.item].key, r.count, batchable(r)});
    }
    const LaunchPlan plan = planLaunches(items, options_.max_batch);
    std::vector<Ready> ordered;
    ordered.reserve(ready.size());
    for (std::size_t j : plan.order)
      ordered.push_back(ready[j]);

    flight.buffer = next_buffer_;
    next_buffer_ = (next_buffer_ + 1) % buffers_.size();
    if (Status status = submit(plan, ordered, buffers_[flight.buffer], flight); !status.ok()) {
      fail(status.message());
      // What was queued before the failure may still run, and the buffer's
      // event may not have been recorded: wait, so that no launch of the batch
      // is left on the GPU when its statuses go out and its mappings may close.
      (void)cudaStreamSynchronize(stream_);
      (void)cudaGetLastError();
      for (std::int32_t& s : flight.status) {
        if (s != kNoWrite) s = kStatusExecutionFailed;
      }
    }
    batch->submitted_ns = nowNs();
    flight.batch = std::move(batch);
    in_flight_.push_back(std::move(flight));
  }

  // Uploads the pointer arrays, launches every group (or replays a graph of
  // both), applies the epilogues, and records the batch's event. A cuBLAS
  // error fails the groups of that launch alone.
  Status submit(const LaunchPlan& plan, const std::vector<Ready>& ordered, Buffer& buffer,
                InFlight& flight) {
    const std::vector<Group>& groups = plan.groups;
    const std::size_t n = plan.problems;
    if (n > 0) {
      std::size_t p = 0;
      for (const Group& group : groups) {
        if (group.alone) continue;
        for (std::size_t r = group.start; r < group.start + group.count; ++r) {
          const Ready& ready = ordered[r];
          for (std::int64_t i = 0; i < ready.count; ++i, ++p) {
            buffer.host[p] = ready.a + i * ready.stride_a;
            buffer.host[n + p] = ready.b + i * ready.stride_b;
            buffer.host[2 * n + p] = ready.c + i * ready.stride_c;
          }
        }
      }
    }
    const float* const* a_array = buffer.device;
    const float* const* b_array = buffer.device + n;
    float* const* c_array = const_cast<float* const*>(buffer.device + 2 * n);
    const bool grouped =
        options_.launch == LaunchMode::kGrouped ||
        (options_.launch == LaunchMode::kAuto &&
         static_cast<std::size_t>(std::count_if(groups.begin(), groups.end(), [](const Group& g) {
           return !g.alone;
         })) >= options_.grouped_min_keys);

    // The arrays' copy and the cuBLAS calls, as a graph replays them too;
    // the calls made, and the runs of groups whose call failed.
    struct Failure {
      std::size_t first, last;
      cublasStatus_t status;
    };
    std::vector<Failure> failures;
    std::uint32_t calls = 0;
    auto enqueue = [&]() -> Status {
      // The arrays go up ahead of the first launch that reads them, and only
      // then: a batch of requests each alone with its key (every batch of a
      // lone tenant) launches cublasSgemm with the operands themselves, and
      // a copy on the stream costs GPU time between two kernels whatever its
      // size (docs/BENCHMARKS.md, twenty-fourth session).
      bool uploaded = false;
      const auto uploadPointerArrays = [&]() -> cudaError_t {
        if (uploaded) return cudaSuccess;
        uploaded = true;
        channel_.gauges().pointer_copies.fetch_add(1, std::memory_order_relaxed);
        return cudaMemcpyAsync(buffer.device, buffer.host, 3 * n * sizeof(float*),
                               cudaMemcpyHostToDevice, stream_);
      };
      std::size_t first = 0;
      while (first < groups.size()) {
        // One grouped launch shares the handle's math mode: take a run of
        // groups with the same modes whose sizes fit the int API.
        std::size_t last = first + 1;
        if (grouped && !groups[first].alone && fitsInt(groups[first].key)) {
          while (last < groups.size() && !groups[last].alone && fitsInt(groups[last].key) &&
                 groups[last].key.math_mode == groups[first].key.math_mode &&
                 groups[last].key.emulation == groups[first].key.emulation) {
            ++last;
          }
        }
        const std::size_t offset = groups[first].first;
        cublasStatus_t status = setModes(groups[first].key);
        if (status == CUBLAS_STATUS_SUCCESS) {
          if (last - first > 1) {
            STMUX_CUDA(uploadPointerArrays());
            status = launchGrouped(groups, first, last, a_array + offset, b_array + offset,
                                   c_array + offset);
          } else if (groups[first].count == 1) {  // alone, or the only request of its key
            status = launchOne(groups[first].key, ordered[groups[first].start]);
          } else {
            STMUX_CUDA(uploadPointerArrays());
            status =
                launchBatched(groups[first], a_array + offset, b_array + offset, c_array + offset);
          }
          ++calls;
        }
        if (status != CUBLAS_STATUS_SUCCESS) failures.push_back({first, last, status});
        first = last;
      }
      return Status::okStatus();
    };
    // A graph holds what is the same at every replay: only batches whose
    // every call is a cublasSgemmBatched from the arrays (the grouped call
    // and plain cublasSgemm take host arrays or the operands themselves).
    const bool graphable = graphs_ != nullptr && n > 0 && !grouped &&
                           std::all_of(groups.begin(), groups.end(),
                                       [](const Group& g) { return !g.alone && g.count > 1; });
    if (Status status =
            graphable ? enqueueAsGraph(plan, flight.buffer, enqueue, failures, calls) : enqueue();
        !status.ok()) {
      return status;
    }
    channel_.gauges().launches.fetch_add(calls, std::memory_order_relaxed);
    for (const Failure& failure : failures) {
      for (std::size_t g = failure.first; g < failure.last; ++g) {
        if (std::uint64_t held = 0; launch_log_.allow(nowNs(), held)) {
          STMUX_WARN(kExec, "GPU {}: a launch of {} requests returned {}{}", options_.device,
                     groups[g].count, cublasGetStatusString(failure.status),
                     held == 0 ? "" : fmt::format(" ({} more such launches not logged)", held));
        }
        const std::int32_t answer =
            answerForRefusedLaunch(static_cast<std::int32_t>(failure.status));
        for (std::size_t p = groups[g].start; p < groups[g].start + groups[g].count; ++p) {
          flight.status[ordered[p].item] = answer;
        }
      }
    }
    launchEpilogues(plan, ordered, buffer, flight);
    STMUX_CUDA(cudaEventRecord(buffer.done, stream_));
    return Status::okStatus();
  }

  // STMUX_LAUNCH_GRAPHS: replays the graph of this buffer's batches of the
  // plan's keys and problems, captures one on its second sighting (a capture
  // queues nothing: the graph is then launched), or calls `enqueue`. A
  // capture that fails (a call that failed in it, or one cuBLAS cannot make
  // in a capture) falls back to `enqueue`, as that signature does from then on.
  template <class Enqueue, class Failures>
  Status enqueueAsGraph(const LaunchPlan& plan, std::size_t buffer, Enqueue& enqueue,
                        Failures& failures, std::uint32_t& calls) {
    LaunchSignature signature{buffer, {}};
    signature.groups.reserve(plan.groups.size());
    for (const Group& group : plan.groups)
      signature.groups.emplace_back(group.key, group.problems);
    BatchGraph* graph = nullptr;
    switch (graphs_->next(signature, graph)) {
      case LaunchGraphs<BatchGraph>::Action::kReplay:
        STMUX_CUDA(cudaGraphLaunch(graph->exec, stream_));
        calls = graph->calls;
        channel_.gauges().graph_launches.fetch_add(1, std::memory_order_relaxed);
        return Status::okStatus();
      case LaunchGraphs<BatchGraph>::Action::kLaunch:
        return enqueue();
      case LaunchGraphs<BatchGraph>::Action::kCapture:
        break;
    }
    cudaGraph_t captured = nullptr;
    cudaGraphExec_t exec = nullptr;
    // Thread-local: the mapper thread's IPC opens go on meanwhile.
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
      const Status enqueued = enqueue();
      const cudaError_t ended = cudaStreamEndCapture(stream_, &captured);
      if (!enqueued.ok() || !failures.empty() || ended != cudaSuccess || captured == nullptr ||
          cudaGraphInstantiate(&exec, captured, 0) != cudaSuccess) {
        exec = nullptr;
      }
      if (captured != nullptr) cudaGraphDestroy(captured);
    }
    if (exec == nullptr) {
      (void)cudaGetLastError();  // what the capture left is not the GPU's fault
      STMUX_INFO(kExec,
                 "GPU {}: a batch of {} keys could not be captured as a graph; "
                 "its launches go directly",
                 options_.device, plan.groups.size());
      graphs_->captured(signature, std::nullopt);
      failures.clear();
      calls = 0;
      return enqueue();
    }
    graphs_->captured(signature, BatchGraph{exec, calls});
    channel_.gauges().graph_captures.fetch_add(1, std::memory_order_relaxed);
    STMUX_CUDA(cudaGraphLaunch(exec, stream_));
    channel_.gauges().graph_launches.fetch_add(1, std::memory_order_relaxed);
    return Status::okStatus();
  }

  // Every epilogue of the batch in one launch, behind its GEMMs on the one
  // stream. The BatchKey has no epilogue, so that requests with and without
  // one (or with different ones) share GEMM launches; the epilogue is then a
  // pass over each C of its own, one kernel for the batch however many keys it
  // has. A request whose GEMM launch failed is left out: its status says so.
  void launchEpilogues(const LaunchPlan& plan, const std::vector<Ready>& ordered, Buffer& buffer,
                       InFlight& flight) {
    const auto wanted = [&](const Ready& ready) {
      return ready.epilogue != kEpilogueNone && flight.status[ready.item] == kStatusSuccess;
    };
    // The kernel strides over what the grid does not cover: at most
    // kEpilogueBlocks blocks of kEpilogueThreads (its __launch_bounds__) for
    // each request, as many as the largest needs.
    constexpr std::int64_t kEpilogueThreads = 256;
    constexpr std::int64_t kEpilogueBlocks = 1024;
    constexpr std::int64_t kMostElements = kEpilogueThreads * kEpilogueBlocks;
    // One item per request, and a batch holds at most max_batch requests
    // (the batcher's limit, which the pointer arrays rely on too).
    std::size_t count = 0;
    std::int64_t widest = 1;  // elements of the largest item, up to kMostElements
    for (const Group& group : plan.groups) {
      const BatchKey& key = group.key;
      for (std::size_t r = group.start; r < group.start + group.count; ++r) {
        const Ready& ready = ordered[r];
        if (!wanted(ready)) continue;
        const float* bias = (ready.epilogue & kEpilogueBias) != 0 ? ready.bias : nullptr;
        buffer.epilogue_host[count++] = EpilogueItem{
            ready.c, bias, key.m, key.n, key.ldc, ready.count, ready.stride_c, ready.epilogue, 0};
        // m, n > 0: a request with an empty C was answered as a no-op.
        const std::int64_t per_problem = key.m * key.n;
        const std::int64_t elements =
            ready.count > kMostElements / per_problem ? kMostElements : ready.count * per_problem;
        widest = std::max(widest, elements);
      }
    }
    if (count == 0) return;
    const dim3 grid(static_cast<unsigned>(std::min(
                        (widest + kEpilogueThreads - 1) / kEpilogueThreads, kEpilogueBlocks)),
                    static_cast<unsigned>(std::min<std::size_t>(count, 65535)));
    std::int64_t items_count = static_cast<std::int64_t>(count);
    const bool copied = count > static_cast<std::size_t>(kEpilogueInlineItems);
    cudaError_t error = cudaSuccess;
    if (!copied) {
      // In the launch's parameters: no copy on the stream ahead of it.
      EpilogueInline inline_items{};
      std::copy_n(buffer.epilogue_host, count, inline_items.items);
      void* arguments[] = {&inline_items, &items_count};
      error = cudaLaunchKernel(reinterpret_cast<const void*>(epilogue_inline_kernel_), grid,
                               dim3(kEpilogueThreads), arguments, 0, stream_);
    } else {
      error = cudaMemcpyAsync(buffer.epilogue_device, buffer.epilogue_host,
                              count * sizeof(EpilogueItem), cudaMemcpyHostToDevice, stream_);
      if (error == cudaSuccess) {
        const EpilogueItem* items = buffer.epilogue_device;
        void* arguments[] = {&items, &items_count};
        error = cudaLaunchKernel(reinterpret_cast<const void*>(epilogue_kernel_), grid,
                                 dim3(kEpilogueThreads), arguments, 0, stream_);
      }
    }
    if (error == cudaSuccess) {
      channel_.gauges().epilogue_launches.fetch_add(1, std::memory_order_relaxed);
      if (copied) channel_.gauges().epilogue_copies.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    // Not sticky (a sticky error fails the batch's event): clear it, or the
    // next cuBLAS call would take it for a failure of its own.
    (void)cudaGetLastError();
    STMUX_WARN(kExec, "GPU {}: the epilogue launch for {} requests failed: {}", options_.device,
               count, cudaError(error));
    for (const Ready& ready : ordered) {
      if (wanted(ready)) flight.status[ready.item] = kStatusExecutionFailed;
    }
  }

  static bool fitsInt(const BatchKey& k) {
    return k.m <= INT_MAX && k.n <= INT_MAX && k.k <= INT_MAX && k.lda <= INT_MAX &&
           k.ldb <= INT_MAX && k.ldc <= INT_MAX;
  }

  cublasStatus_t setModes(const BatchKey& key) {
    cublasStatus_t status = cublasSetMathMode(handle_, static_cast<cublasMath_t>(key.math_mode));
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    return cublasSetEmulationStrategy(handle_,
                                      static_cast<cublasEmulationStrategy_t>(key.emulation));
  }

  // A request alone: cublasSgemm itself, or cublasSgemmStridedBatched for a
  // strided batch. cuBLAS's batched kernels for a batch of one can be much
  // slower (measured: 256x128x1152 took 34 us batched, 19 us plain, on an
  // H200; docs/BENCHMARKS.md).
  cublasStatus_t launchOne(const BatchKey& k, const Ready& ready) {
    float alpha, beta;
    std::memcpy(&alpha, &k.alpha_bits, sizeof(float));
    std::memcpy(&beta, &k.beta_bits, sizeof(float));
    const auto ta = static_cast<cublasOperation_t>(k.transa);
    const auto tb = static_cast<cublasOperation_t>(k.transb);
    if (ready.count > 1) {
      if (fitsInt(k) && ready.count <= INT_MAX) {
        return cublasSgemmStridedBatched(
            handle_, ta, tb, static_cast<int>(k.m), static_cast<int>(k.n), static_cast<int>(k.k),
            &alpha, ready.a, static_cast<int>(k.lda), ready.stride_a, ready.b,
            static_cast<int>(k.ldb), ready.stride_b, &beta, ready.c, static_cast<int>(k.ldc),
            ready.stride_c, static_cast<int>(ready.count));
      }
      return cublasSgemmStridedBatched_64(handle_, ta, tb, k.m, k.n, k.k, &alpha, ready.a, k.lda,
                                          ready.stride_a, ready.b, k.ldb, ready.stride_b, &beta,
                                          ready.c, k.ldc, ready.stride_c, ready.count);
    }
    if (fitsInt(k)) {
      return cublasSgemm_v2(handle_, ta, tb, static_cast<int>(k.m), static_cast<int>(k.n),
                            static_cast<int>(k.k), &alpha, ready.a, static_cast<int>(k.lda),
                            ready.b, static_cast<int>(k.ldb), &beta, ready.c,
                            static_cast<int>(k.ldc));
    }
    return cublasSgemm_v2_64(handle_, ta, tb, k.m, k.n, k.k, &alpha, ready.a, k.lda, ready.b, k.ldb,
                             &beta, ready.c, k.ldc);
  }

  cublasStatus_t launchBatched(const Group& group, const float* const* a, const float* const* b,
                               float* const* c) {
    const BatchKey& k = group.key;
    float alpha, beta;
    std::memcpy(&alpha, &k.alpha_bits, sizeof(float));
    std::memcpy(&beta, &k.beta_bits, sizeof(float));
    const auto ta = static_cast<cublasOperation_t>(k.transa);
    const auto tb = static_cast<cublasOperation_t>(k.transb);
    if (fitsInt(k) && group.problems <= INT_MAX) {
      return cublasSgemmBatched(handle_, ta, tb, static_cast<int>(k.m), static_cast<int>(k.n),
                                static_cast<int>(k.k), &alpha, a, static_cast<int>(k.lda), b,
                                static_cast<int>(k.ldb), &beta, c, static_cast<int>(k.ldc),
                                static_cast<int>(group.problems));
    }
    return cublasSgemmBatched_64(handle_, ta, tb, k.m, k.n, k.k, &alpha, a, k.lda, b, k.ldb, &beta,
                                 c, k.ldc, static_cast<std::int64_t>(group.problems));
  }

  cublasStatus_t launchGrouped(const std::vector<Group>& groups, std::size_t first,
                               std::size_t last, const float* const* a, const float* const* b,
                               float* const* c) {
    const std::size_t count = last - first;
    std::vector<cublasOperation_t> transa(count), transb(count);
    std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count), sizes(count);
    std::vector<float> alpha(count), beta(count);
    for (std::size_t i = 0; i < count; ++i) {
      const BatchKey& key = groups[first + i].key;
      transa[i] = static_cast<cublasOperation_t>(key.transa);
      transb[i] = static_cast<cublasOperation_t>(key.transb);
      m[i] = static_cast<int>(key.m);
      n[i] = static_cast<int>(key.n);
      k[i] = static_cast<int>(key.k);
      lda[i] = static_cast<int>(key.lda);
      ldb[i] = static_cast<int>(key.ldb);
      ldc[i] = static_cast<int>(key.ldc);
      std::memcpy(&alpha[i], &key.alpha_bits, sizeof(float));
      std::memcpy(&beta[i], &key.beta_bits, sizeof(float));
      sizes[i] = static_cast<int>(groups[first + i].problems);
    }
    return cublasSgemmGroupedBatched(handle_, transa.data(), transb.data(), m.data(), n.data(),
                                     k.data(), alpha.data(), a, lda.data(), b, ldb.data(),
                                     beta.data(), c, ldc.data(), static_cast<int>(count),
                                     sizes.data());
  }

  bool pollFront() {
    if (in_flight_.empty()) return false;
    const cudaError_t state = cudaEventQuery(buffers_[in_flight_.front().buffer].done);
    if (state == cudaErrorNotReady) return false;
    if (state != cudaSuccess) {
      // A sticky error: this context can run nothing more. Whatever was in
      // flight may have been partly done. (Should the error not be sticky
      // after all, nothing of the batches may still run once their callers
      // are told: those with beta 0 run their calls again.)
      fail(fmt::format("the GPU failed a batch: {}", cudaError(state)));
      (void)cudaStreamSynchronize(stream_);
      for (InFlight& flight : in_flight_) {
        for (std::int32_t& s : flight.status) {
          if (s != kNoWrite) s = kStatusExecutionFailed;
        }
      }
      while (!in_flight_.empty())
        completeFront();
      return true;
    }
    completeFront();
    return true;
  }

  void completeFront() {
    InFlight flight = std::move(in_flight_.front());
    in_flight_.pop_front();
    flight.batch->seen_ns = nowNs();
    wakers_->publish(*flight.batch, flight.status);
    flight.batch->done_ns = nowNs();
    cache_->batchCompleted(flight.batch->id);
    channel_.gauges().mapped.store(cache_->size(), std::memory_order_relaxed);
    channel_.finish(std::move(flight.batch));
  }

  void fail(const std::string& why) {
    if (channel_.markBroken()) {
      STMUX_ERROR(kExec, "GPU {}: {}; its calls now go back to the callers' own cuBLAS",
                  options_.device, why);
    }
  }

  ExecutorOptions options_;
  ExecutorChannel& channel_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::thread mapper_;
  std::atomic<bool> mapper_stop_{false};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  void* scratch_ = nullptr;
  cudaLibrary_t epilogue_library_ = nullptr;
  cudaKernel_t epilogue_kernel_ = nullptr;         // items in device memory
  cudaKernel_t epilogue_inline_kernel_ = nullptr;  // items in its parameters
  PFN_cuMemGetAddressRange_v3020 get_address_range_ = nullptr;
  std::vector<Buffer> buffers_;
  std::size_t next_buffer_ = 0;
  std::deque<InFlight> in_flight_;
  std::unique_ptr<MappingCache> cache_;
  std::unique_ptr<Wakers> wakers_;
  // A line a second at most for what a client's requests can make repeat
  // (operands it cannot have mapped, launches cuBLAS refuses).
  LogLimiter map_log_, launch_log_;
  // STMUX_LAUNCH_GRAPHS: a replayable batch's launches, and how many cuBLAS
  // calls they are.
  struct BatchGraph {
    cudaGraphExec_t exec;
    std::uint32_t calls;
  };
  std::unique_ptr<LaunchGraphs<BatchGraph>> graphs_;
};

Executor::Executor(ExecutorOptions options, ExecutorChannel& channel)
    : impl_(std::make_unique<Impl>(options, channel)) {}
Executor::~Executor() {
  stop();
}
Status Executor::start() {
  return impl_->start();
}
void Executor::stop() {
  impl_->stop();
}

}  // namespace stmux::daemon
