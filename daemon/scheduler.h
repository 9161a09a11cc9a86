// stmuxd's RequestSink: validates every request, routes it to its GPU's
// batcher by UUID, hands launched batches to that GPU's executor and takes
// finished ones back. Runs on the server's thread; no CUDA here, so it is
// tested end to end on machines without a GPU against a fake executor.
#pragma once

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "daemon/batcher.h"
#include "daemon/channel.h"
#include "daemon/server.h"
#include "stmux/log.h"
#include "stmux/sys.h"

namespace stmux::daemon {

struct GpuInfo {
  int index = 0;  // the daemon's CUDA ordinal
  Uuid uuid{};
  std::string name;
  bool mps = false;  // the daemon's context on it is an MPS client
};

std::string formatUuid(const Uuid& uuid);  // GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx

// The GPUs of `gpus` that STMUX_DEVICES's items (`wanted`: indices and
// UUIDs, as the configuration parsed them; none: all) name, in their order.
// A GPU named twice (an index and its UUID, say) or an item naming none is
// an error that lists the GPUs there are.
Result<std::vector<GpuInfo>> chooseGpus(const std::vector<GpuInfo>& gpus,
                                        const std::vector<std::string>& wanted);

class Scheduler : public RequestSink {
 public:
  // One channel per GPU, in the same order as `gpus`; the channels' executors
  // ring `wakeFd()` when they finish a batch. `mappings_per_client`: the
  // executors' STMUX_MAX_MAPPINGS, which bounds what the scheduler keeps
  // track of too.
  Scheduler(BatcherOptions options, std::vector<GpuInfo> gpus,
            std::vector<ExecutorChannel*> channels, std::size_t mappings_per_client = 4096);

  void onDetach(const ClientPtr& client) override;
  void onRequest(const ClientPtr& client, const Request& request, std::uint64_t now_ns) override;
  void onRelease(const ClientPtr& client, const std::uint64_t* alloc_ids,
                 std::size_t count) override;
  bool takesNotices() const override;
  bool poll(std::uint64_t now_ns, std::uint64_t& wake_at_ns) override;
  bool busy() const override;
  int wakeFd() const override { return wake_fd_.get(); }
  // A GPU on MPS whose context failed: the MPS server takes no new client
  // until every client it faulted has exited, the daemon included.
  std::string mustEnd() const override;
  void addStatus(nlohmann::ordered_json& status) const override;
  void addMetrics(MetricsText& out) const override;

  // For the executors' channels, made before the scheduler.
  static UniqueFd makeWakeFd() { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }
  void adoptWakeFd(UniqueFd fd) { wake_fd_ = std::move(fd); }

  std::uint64_t rejected() const { return rejected_; }

 private:
  // Where a round's time goes in the daemon, summed over requests
  // (docs/BENCHMARKS.md): the client's push to the daemon's pop; for
  // stream-ordered requests the pop to their streams' being ready; the batch
  // taken from the batcher to the executor's taking it from its queue; that
  // to its launches queued; those queued to the batch seen done; that to its
  // statuses published. The batcher's own wait is its stats' wait_ns.
  struct RoundTimes {
    std::uint64_t popped = 0, ring_ns = 0;
    std::uint64_t readied = 0, ready_ns = 0;
    std::uint64_t completed = 0, handoff_ns = 0, launch_ns = 0, gpu_ns = 0, publish_ns = 0;
  };
  // A client allocation on one GPU, as far as the scheduler knows: mapped
  // (the mapper opened it and the executor adopted it, or the executor maps
  // it itself), or being opened by the mapper.
  struct Memory {
    IpcHandle handle{};
    std::uint64_t base = 0, bytes = 0;  // where the client has it
    bool mapped = false;
  };
  using MemoryKey = std::pair<std::uint32_t, std::uint64_t>;  // client id, allocation id
  struct Gpu {
    GpuInfo info;
    ExecutorChannel* channel;
    Batcher batcher;
    // Requests not yet for the batcher: stream-ordered ones whose callers'
    // streams have not yet done the work queued before them, and any whose
    // memory the mapper is still opening. They join the batcher when both
    // are done, so that neither a late tenant nor an allocation being opened
    // holds up a batch (an open takes the executor's thread no more).
    std::vector<Queued> awaiting;
    std::map<MemoryKey, Memory> memory;
    RoundTimes round;
    // Allocations the mapper is opening (status and metrics).
    std::size_t opening() const {
      return static_cast<std::size_t>(std::count_if(
          memory.begin(), memory.end(), [](const auto& m) { return !m.second.mapped; }));
    }
  };
  // Moves the ready ones of `gpu.awaiting` to its batcher; sets `wake_at_ns`
  // to when to look again while streams are awaited.
  bool admitReady(Gpu& gpu, std::uint64_t now_ns, std::uint64_t& wake_at_ns);
  // Whether every allocation the request touches is mapped on `gpu`; has the
  // mapper open those that are not and are not being opened. Unmappable:
  // it would take more opens than an honest request ever needs (requests of
  // a confused client that each unmap what another needs). Over the open
  // budget: it needs an open, and its client's opens, or those of its
  // client's user, failed beyond their budget (garbage handles). Both are
  // declined.
  enum class Mapping { kMapped, kOpening, kUnmappable, kOverOpenBudget };
  // Answers a request whose memory is unmappable or over the open budget:
  // declined, to run in its caller.
  void declineUnmapped(const Queued& item, Mapping mapping);
  Mapping memoryMapped(Gpu& gpu, Queued& item);
  // What the mapper did: mappings go to the executor; a failure declines the
  // requests that waited for it (their callers run them themselves).
  bool takeOpened(Gpu& gpu);
  void forgetMemory(Gpu& gpu, std::uint32_t client);
  Gpu* route(const Uuid& uuid);
  void reject(const ClientPtr& client, const Request& request, std::int32_t status);
  // The failed-open budgets (scheduler.cc): whether the client's is spent,
  // or its user's where its own opens failed; charging a failure to both,
  // whether that spent either for it.
  bool openBudgetSpent(const Client& client, std::uint64_t now_ns) const;
  bool chargeFailedOpen(Client& client, std::uint64_t now_ns);

  std::vector<Gpu> gpus_;
  std::size_t mappings_per_client_;
  // Allocations the mapper could not open: a line a second at most (a client
  // sending garbage handles would otherwise fill the log).
  LogLimiter map_log_;
  // Per user, when its failed-open budget is full again; only users whose
  // budget is not full are kept (Client::open_budget_full_ns, per client).
  std::map<uid_t, std::uint64_t> user_open_budget_full_ns_;
  UniqueFd wake_fd_;
  std::uint64_t rejected_ = 0;  // answered without reaching a batcher
};

}  // namespace stmux::daemon
