#include "daemon/scheduler.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <span>
#include <string>

#include "stmux/gemm.h"
#include "stmux/json.h"
#include "stmux/log.h"
#include "stmux/precision.h"
#include "stmux/segment.h"

namespace stmux::daemon {
namespace {

// These requests are done with (completed, or dropped with their client).
void settle(std::span<const Queued> items) {
  for (const Queued& item : items) {
    if (item.client->outstanding > 0) --item.client->outstanding;
    if (item.answered) item.client->answered.fetch_sub(1, std::memory_order_relaxed);
  }
}

// How often the server looks at the ready words of requests still awaiting
// their callers' streams once it stops spinning: a tenth of how long the
// oldest has waited, between 20 us and 1 ms, so that a stream held up for
// long (its caller queued a long kernel first) costs the daemon little, and
// a short wait little latency.
constexpr std::uint64_t kReadyLookMinNs = 20'000;
// A request whose submit time is further back than this was not timed by an
// honest clock (a ring holds requests for microseconds, at most the timeout).
constexpr std::uint64_t kPlausibleRingNs = 3'600'000'000'000;
constexpr std::uint64_t kReadyLookMaxNs = 1'000'000;
// The most opens one request may ask of the mapper: each of its (at most
// four) allocations four times. An honest request needs each once, again
// only when the scheduler forgot it meanwhile (a freed neighbour, a client
// with more allocations than are kept mapped). Two requests that describe
// one allocation two ways unmap each other's at every look and, with more
// than one such allocation, never both find all theirs mapped: unbounded,
// the mapper opened for ever (fuzz_ring's inputs that did not settle).
constexpr std::uint32_t kMostOpensPerRequest = 16;
// Commands waiting for an executor's queue beyond which release notices are
// no longer taken from the clients (takesNotices): as many as the queue
// holds, some 63,000 allocation ids. Opens waiting for the mapper do not
// count: a notice adds none, and one client's opens held back every client's
// notices (issue 14, a flood of garbage memory handles).
constexpr std::size_t kMostWaitingCommands = 1024;
// A client's opens waiting for the mapper, per slot: one request's operands
// (A, B, C and a bias), as many as its requests can use at once
// (ExecutorChannel::postOpen).
constexpr std::size_t kMostOpensPerSlot = 4;
// Opens of a client's memory that may fail: kFailedOpenBurst at once, then
// one every kFailedOpenEveryNs (a budget kept as the time it is full again).
// Each failed open is still a driver call, made beside the executor's
// launches: a client pushing 62,000 requests a second with garbage handles,
// each needing opens that failed, took the other tenants to 0.33x of their
// calls/s (H100, stmux-fault dos; with the budget 1.00x to 1.16x). An
// honest shim sends only live, exportable allocations, whose opens fail
// rarely. Beyond the budget the client's requests that need an open are
// declined unopened (its callers run them) and its waiting opens dropped.
// A user's clients together have a budget too, four clients' worth: each
// client of a user may have its own (STMUX_MAX_CLIENTS_PER_UID of them), and
// 512 clients' budgets would allow 51,200 failed opens a second. Once it is
// spent, those of the user's clients whose opens have failed are declined
// unopened; the others' opens are still tried (tenants sharing a service
// uid are not declined for one of them), so each client of a user flooding
// garbage handles gets a few failures (those the mapper has in hand)
// beyond the user's budget.
constexpr std::uint64_t kFailedOpenEveryNs = 10'000'000;
constexpr std::uint64_t kFailedOpenBurst = 32;
constexpr std::uint64_t kUserBudgetClients = 4;
constexpr std::uint64_t kUserFailedOpenEveryNs = kFailedOpenEveryNs / kUserBudgetClients;
constexpr std::uint64_t kUserFailedOpenBurst = kFailedOpenBurst * kUserBudgetClients;

// A budget of `burst` failures, refilled one every `every_ns`, kept as the
// time it is full again.
bool budgetSpent(std::uint64_t full_ns, std::uint64_t now_ns, std::uint64_t burst,
                 std::uint64_t every_ns) {
  return full_ns > now_ns + burst * every_ns;
}
void charge(std::uint64_t& full_ns, std::uint64_t now_ns, std::uint64_t every_ns) {
  full_ns = std::max(full_ns, now_ns) + every_ns;
}

// Calls `f` with each operand a (valid) request reads or writes.
template <class F>
void forEachTouched(const Request& r, F&& f) {
  const auto extents = gemmExtents(GemmShape::of(r));
  if (!extents) return;
  if (extents->a != 0) f(r.a);
  if (extents->b != 0) f(r.b);
  if (extents->c != 0) f(r.c);
  if (extents->bias != 0) f(r.bias);
}

// Whether the operands a request touches describe each allocation they name
// alike: one handle and base wherever one id appears. An honest shim
// describes an allocation one way; two descriptions under one id would have
// the mapper open one, then the other in its place, at every look.
bool describedAlike(const Request& r) {
  std::array<const OperandDesc*, 4> seen{};
  std::size_t count = 0;
  bool alike = true;
  forEachTouched(r, [&](const OperandDesc& operand) {
    for (std::size_t i = 0; i < count; ++i) {
      if (seen[i]->alloc_id == operand.alloc_id &&
          (seen[i]->handle != operand.handle || seen[i]->base != operand.base)) {
        alike = false;
      }
    }
    seen[count++] = &operand;
  });
  return alike;
}

}  // namespace

std::string formatUuid(const Uuid& uuid) {
  const std::uint8_t* b = uuid.bytes;
  return fmt::format(
      "GPU-{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}"
      "{:02x}{:02x}",
      b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
      b[15]);
}

Result<std::vector<GpuInfo>> chooseGpus(const std::vector<GpuInfo>& gpus,
                                        const std::vector<std::string>& wanted) {
  if (wanted.empty()) return gpus;
  const auto lower = [](std::string text) {
    std::transform(text.begin(), text.end(), text.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return text;
  };
  std::vector<GpuInfo> chosen;
  std::vector<std::string> named_by;  // the item that chose each
  for (const std::string& item : wanted) {
    const bool index = !item.empty() && std::isdigit(static_cast<unsigned char>(item[0]));
    auto it = std::find_if(gpus.begin(), gpus.end(), [&](const GpuInfo& gpu) {
      // Items are validated: an index is 1 to 4 digits ("00" is GPU 0).
      if (index) return std::stoi(item) == gpu.index;
      return lower(formatUuid(gpu.uuid)) == lower(item);
    });
    if (it == gpus.end()) {
      std::string have;
      for (const GpuInfo& gpu : gpus)
        have += fmt::format("{}{} ({})", have.empty() ? "" : ", ", gpu.index, formatUuid(gpu.uuid));
      return Status::error(fmt::format(
          "STMUX_DEVICES names '{}', which is not a GPU here; the GPUs are: {}", item, have));
    }
    for (std::size_t i = 0; i < chosen.size(); ++i) {
      if (chosen[i].index == it->index) {
        return Status::error(fmt::format("STMUX_DEVICES names GPU {} twice ('{}' and '{}')",
                                         it->index, named_by[i], item));
      }
    }
    chosen.push_back(*it);
    named_by.push_back(item);
  }
  return chosen;
}

Scheduler::Scheduler(BatcherOptions options, std::vector<GpuInfo> gpus,
                     std::vector<ExecutorChannel*> channels, std::size_t mappings_per_client)
    : mappings_per_client_(mappings_per_client) {
  for (std::size_t i = 0; i < gpus.size(); ++i) {
    gpus_.push_back(Gpu{std::move(gpus[i]), channels[i], Batcher(options), {}, {}, {}});
  }
}

Scheduler::Gpu* Scheduler::route(const Uuid& uuid) {
  for (Gpu& gpu : gpus_) {
    if (gpu.info.uuid == uuid) return &gpu;
  }
  return nullptr;
}

void Scheduler::reject(const ClientPtr& client, const Request& request, std::int32_t status) {
  ++rejected_;
  // Unclaimed, so completing it from pending is allowed; a concurrent cancel
  // by the client simply wins.
  requestComplete(client->view, request, status);
}

void Scheduler::onRequest(const ClientPtr& client, const Request& request, std::uint64_t now_ns) {
  if (request.op != static_cast<std::uint32_t>(Op::kSgemm)) {
    return reject(client, request, kStatusDeclined);
  }
  Gpu* gpu = route(request.device);
  if (gpu == nullptr || gpu->channel->gauges().broken.load(std::memory_order_relaxed)) {
    return reject(client, request, kStatusDeclined);
  }
  const GemmShape shape = GemmShape::of(request);
  if (const std::int32_t status = checkGemmArgs(shape); status != kStatusSuccess) {
    STMUX_DEBUG(kSched, "client {} request {}: invalid arguments", client->id, request.request_id);
    return reject(client, request, status);
  }
  if (gemmIsNoOp(request)) return reject(client, request, kStatusSuccess);
  const auto extents = gemmExtents(shape);
  // An operand that must be read or written has to be described; an extent
  // past 2^63 bytes fits no allocation.
  if (!extents || (extents->a != 0 && request.a.alloc_id == 0) ||
      (extents->b != 0 && request.b.alloc_id == 0) || request.c.alloc_id == 0 ||
      (extents->bias != 0 && request.bias.alloc_id == 0)) {
    return reject(client, request, kStatusInvalidValue);
  }
  // The shim serves only strided batches whose problems write apart
  // (servedStrides); any other came from a client writing its ring itself,
  // and would let a tiny C take the GPU for as long as its count says.
  if (!servedStrides(shape)) {
    STMUX_DEBUG(kSched, "client {} request {}: strides the shim never serves", client->id,
                request.request_id);
    return reject(client, request, kStatusDeclined);  // it runs in its caller
  }
  if (!describedAlike(request)) {
    STMUX_DEBUG(kSched, "client {} request {}: operands describe one allocation two ways",
                client->id, request.request_id);
    return reject(client, request, kStatusDeclined);  // it runs in its caller
  }
  // A math mode or emulation strategy this cuBLAS does not name: its launch
  // would fail, with a warning a request (a flood of them, found by review).
  // The shim sends the handle's own, which cuBLAS would have refused to set.
  if (!knownPrecision(request.math_mode, request.emulation)) {
    STMUX_DEBUG(kSched, "client {} request {}: math mode {} or emulation {} unknown", client->id,
                request.request_id, request.math_mode, request.emulation);
    return reject(client, request, kStatusDeclined);  // it runs in its caller
  }
  // One request per completion slot is all an honest shim can have pending;
  // beyond that a client only grows the daemon's memory. Declined: it runs
  // directly, should a confused shim be the sender.
  // (The executor's markAnswered came before the status the client saw
  // before it reused a slot for this request.)
  if (client->unanswered() >= client->view.layout().slot_count) {
    if (client->refused++ == 0) {
      STMUX_WARN(kSched,
                 "client {} (pid {}) has {} requests outstanding, as many as it has slots; "
                 "declining the excess",
                 client->id, client->pid, client->unanswered());
    }
    return reject(client, request, kStatusDeclined);
  }
  ++client->outstanding;
  // The client's clock is this host's CLOCK_MONOTONIC; a time it could not
  // have written (ahead, or absurdly far behind) is left out.
  if (request.submit_ns != 0 && request.submit_ns <= now_ns &&
      now_ns - request.submit_ns < kPlausibleRingNs) {
    ++gpu->round.popped;
    gpu->round.ring_ns += now_ns - request.submit_ns;
  }
  Queued item{client, request, BatchKey::of(request), now_ns};
  const Mapping mapping = memoryMapped(*gpu, item);
  if (mapping == Mapping::kUnmappable || mapping == Mapping::kOverOpenBudget) {
    // At once: waiting to be declined at the next look, a flooding client's
    // requests were cancelled first (their slots re-armed), uncounted.
    return declineUnmapped(item, mapping);
  }
  if (mapping != Mapping::kMapped || !requestReady(client->view.slot(request.slot), request)) {
    gpu->awaiting.push_back(std::move(item));
    return;
  }
  gpu->batcher.add(std::move(item), now_ns);
}

void Scheduler::declineUnmapped(const Queued& item, Mapping mapping) {
  if (mapping == Mapping::kOverOpenBudget) ++item.client->declined_unopened;
  STMUX_DEBUG(kSched, "client {} request {}: {}; declined", item.client->id,
              item.request.request_id,
              mapping == Mapping::kUnmappable
                  ? fmt::format("its memory took {} opens", item.opens)
                  : std::string("its client's failed opens spent their budget"));
  reject(item.client, item.request, kStatusDeclined);  // it runs in its caller
  settle(std::span<const Queued>(&item, 1));
}

bool Scheduler::openBudgetSpent(const Client& client, std::uint64_t now_ns) const {
  if (budgetSpent(client.open_budget_full_ns, now_ns, kFailedOpenBurst, kFailedOpenEveryNs)) {
    return true;
  }
  // The user's budget holds back only those of its clients whose opens have
  // failed: a tenant that never sent a bad handle is not declined for
  // another of its uid that does (16 such clients spent it at once).
  if (client.failed_opens == 0) return false;
  const auto user = user_open_budget_full_ns_.find(client.uid);
  return user != user_open_budget_full_ns_.end() &&
         budgetSpent(user->second, now_ns, kUserFailedOpenBurst, kUserFailedOpenEveryNs);
}

bool Scheduler::chargeFailedOpen(Client& client, std::uint64_t now_ns) {
  ++client.failed_opens;
  charge(client.open_budget_full_ns, now_ns, kFailedOpenEveryNs);
  // Users whose budget is full again are forgotten: as many are kept as
  // have had failures within the last 0.32 s, at most.
  std::erase_if(user_open_budget_full_ns_,
                [now_ns](const auto& user) { return user.second <= now_ns; });
  charge(user_open_budget_full_ns_[client.uid], now_ns, kUserFailedOpenEveryNs);
  return openBudgetSpent(client, now_ns);
}

Scheduler::Mapping Scheduler::memoryMapped(Gpu& gpu, Queued& item) {
  const std::uint32_t client = item.client->id;
  bool all = true, unmappable = false, over_budget = false;
  forEachTouched(item.request, [&](const OperandDesc& operand) {
    if (unmappable || over_budget) return;
    const MemoryKey key{client, operand.alloc_id};
    auto found = gpu.memory.find(key);
    if (found != gpu.memory.end() &&
        (!found->second.mapped ||
         (found->second.handle == operand.handle && found->second.base == operand.base))) {
      all = all && found->second.mapped;  // mapped, or being opened (then look again once it is)
      return;
    }
    if (item.opens == kMostOpensPerRequest) {
      unmappable = true;
      return;
    }
    if (openBudgetSpent(*item.client, nowNs())) {
      over_budget = true;
      return;
    }
    ++item.opens;
    const auto it = found != gpu.memory.end() ? found : gpu.memory.try_emplace(key).first;
    Memory& memory = it->second;
    // New, or mapped as other memory under the same id (only a confused
    // client does that): the mapper opens it. The client's mapped
    // allocations that overlap it were freed, since live ones never overlap:
    // the executor closes them first (or once no batch in flight uses them),
    // as CUDA will not open memory at an address still mapped.
    all = false;
    memory = Memory{operand.handle, operand.base, operand.alloc_bytes, false};
    auto release = std::make_unique<ExecCommand>();
    std::size_t known = 0;
    for (auto other = gpu.memory.lower_bound(MemoryKey{client, 0});
         other != gpu.memory.end() && other->first.first == client; ++known) {
      if (other != it && other->second.mapped &&
          allocationsOverlap(operand.base, operand.alloc_bytes, other->second.base,
                             other->second.bytes)) {
        release->alloc_ids.push_back(other->first.second);
        other = gpu.memory.erase(other);
      } else {
        ++other;
      }
    }
    if (known > 2 * mappings_per_client_) {
      // A client with this many live allocations outgrew the executor's
      // cache, which closes its least recently used: forget what is mapped,
      // so that this list stays bounded. Forgotten allocations are opened
      // again at their next use (the same handle opened twice in a process
      // is counted, not mapped twice, and the executor closes the copy).
      for (auto other = gpu.memory.lower_bound(MemoryKey{client, 0});
           other != gpu.memory.end() && other->first.first == client;) {
        other = other != it && other->second.mapped ? gpu.memory.erase(other) : std::next(other);
      }
    }
    if (!release->alloc_ids.empty()) {
      release->kind = ExecCommand::Kind::kRelease;
      release->client_id = item.client->id;
      gpu.channel->post(std::move(release));
    }
    auto job = std::make_unique<OpenJob>();
    job->client = item.client;
    job->operand = operand;
    gpu.channel->postOpen(std::move(job),
                          kMostOpensPerSlot * item.client->view.layout().slot_count);
  });
  if (unmappable) return Mapping::kUnmappable;
  if (over_budget) return Mapping::kOverOpenBudget;
  return all ? Mapping::kMapped : Mapping::kOpening;
}

bool Scheduler::takeOpened(Gpu& gpu) {
  bool progressed = false;
  std::vector<MemoryKey> unopened;  // memory not opened, that requests may await
  while (std::unique_ptr<OpenJob> job = gpu.channel->takeOpened()) {
    progressed = true;
    const ClientPtr& client = job->client;
    const OperandDesc& operand = job->operand;
    const auto it = gpu.memory.find(MemoryKey{client->id, operand.alloc_id});
    // Still wanted: its client is here, has not released it, and no other
    // memory took its id since.
    const bool wanted = it != gpu.memory.end() && !it->second.mapped &&
                        it->second.handle == operand.handle && it->second.base == operand.base;
    if (job->ok) {
      auto command = std::make_unique<ExecCommand>();
      command->kind = wanted ? ExecCommand::Kind::kAdopt : ExecCommand::Kind::kClose;
      command->client_id = client->id;
      command->operand = operand;
      command->mapped = job->mapped;
      gpu.channel->post(std::move(command));
      if (wanted) it->second.mapped = true;
    } else if (wanted && job->already_mapped) {
      // Memory at its address is still mapped by the executor (a freed
      // predecessor it has not closed yet): the executor maps it itself at
      // the first batch that needs it, closing what is in the way.
      it->second.mapped = true;
    } else {
      // An open crowded out counts as one that failed: a client re-arming
      // its slots over requests with garbage handles had its opens dropped
      // at that bound faster than the mapper failed any, and, under no
      // budget, cost the scheduler an open to try at every request (a
      // slower mapper, or the CPU tests under TSan).
      if ((!job->dropped || job->crowded_out) && !job->already_mapped &&
          chargeFailedOpen(*client, nowNs())) {
        // Its other opens would most likely fail too: they are answered
        // unopened, declining what waited for them.
        gpu.channel->dropOpens(client->id,
                               "dropped unopened: too many of its client's opens failed");
      }
      if (!wanted) continue;
      if (std::uint64_t held = 0; map_log_.allow(nowNs(), held)) {
        STMUX_WARN(kMem, "client {} (pid {}): cannot map allocation {}: {}{}", client->id,
                   client->pid, operand.alloc_id, job->error,
                   held == 0 ? "" : fmt::format(" ({} more such failures not logged)", held));
      }
      gpu.memory.erase(it);
      unopened.push_back(MemoryKey{client->id, operand.alloc_id});
    }
  }
  if (!unopened.empty()) {
    // What waited for memory that was not opened runs in its caller, as a
    // request the executor cannot map is answered. One look at what waits
    // for them all: one for each (a client's opens dropped at once, its
    // budget spent) took the scheduler thread for milliseconds.
    std::sort(unopened.begin(), unopened.end());
    const auto declined =
        std::stable_partition(gpu.awaiting.begin(), gpu.awaiting.end(), [&](const Queued& q) {
          bool uses = false;
          forEachTouched(q.request, [&](const OperandDesc& o) {
            uses |= std::binary_search(unopened.begin(), unopened.end(),
                                       MemoryKey{q.client->id, o.alloc_id});
          });
          return !uses;
        });
    for (auto q = declined; q != gpu.awaiting.end(); ++q)
      reject(q->client, q->request, kStatusDeclined);
    settle(std::span<const Queued>(declined, gpu.awaiting.end()));
    gpu.awaiting.erase(declined, gpu.awaiting.end());
  }
  return progressed;
}

void Scheduler::forgetMemory(Gpu& gpu, std::uint32_t client) {
  gpu.memory.erase(gpu.memory.lower_bound(MemoryKey{client, 0}),
                   gpu.memory.upper_bound(MemoryKey{client, UINT64_MAX}));
}

bool Scheduler::admitReady(Gpu& gpu, std::uint64_t now_ns, std::uint64_t& wake_at_ns) {
  bool progressed = false;
  std::uint64_t oldest = now_ns;
  bool streams_awaited = false;
  auto kept = gpu.awaiting.begin();
  for (auto it = gpu.awaiting.begin(); it != gpu.awaiting.end(); ++it) {
    const Slot& slot = it->client->view.slot(it->request.slot);
    if (!slotPending(slot, it->request.generation)) {
      // Its caller gave up on it (its timeout: it ran the call itself) and
      // may have freed its memory and said so since: opening that memory
      // now would keep it mapped for good (found by review).
      settle(std::span<const Queued>(&*it, 1));
      progressed = true;
      continue;
    }
    const bool ready = requestReady(slot, it->request);
    const Mapping mapping = ready ? memoryMapped(gpu, *it) : Mapping::kOpening;
    if (mapping == Mapping::kUnmappable || mapping == Mapping::kOverOpenBudget) {
      declineUnmapped(*it, mapping);
      progressed = true;
      continue;
    }
    if (mapping == Mapping::kMapped) {
      // Its wait in the batcher starts now: the time before was the
      // caller's (and the mapper's).
      if (streamOrdered(it->request)) {
        ++gpu.round.readied;
        gpu.round.ready_ns += now_ns - it->arrival_ns;
      }
      it->arrival_ns = now_ns;
      gpu.batcher.add(std::move(*it), now_ns);
      progressed = true;
      continue;
    }
    if (!ready) {
      streams_awaited = true;
      oldest = std::min(oldest, it->arrival_ns);
    }
    if (kept != it) *kept = std::move(*it);
    ++kept;
  }
  gpu.awaiting.erase(kept, gpu.awaiting.end());
  // The mapper rings when it is done; a stream's ready word only is looked at.
  if (streams_awaited) {
    const std::uint64_t look = std::clamp((now_ns - oldest) / 10, kReadyLookMinNs, kReadyLookMaxNs);
    if (wake_at_ns == 0 || now_ns + look < wake_at_ns) wake_at_ns = now_ns + look;
  }
  return progressed;
}

void Scheduler::onDetach(const ClientPtr& client) {
  // What never reached the GPU is declined, not dropped: a client the daemon
  // lets go while it lives (the daemon stopping with requests awaiting their
  // memory or their caller's stream) runs them itself, or its watcher takes
  // them over, instead of finding them unanswered. A cancel wins as ever.
  const auto decline = [&](std::span<const Queued> requests) {
    for (const Queued& q : requests)
      reject(q.client, q.request, kStatusDeclined);
    settle(requests);
  };
  for (Gpu& gpu : gpus_) {
    decline(gpu.batcher.removeTenant(client->id));
    const auto gone = std::stable_partition(gpu.awaiting.begin(), gpu.awaiting.end(),
                                            [&](const Queued& q) { return q.client != client; });
    decline(std::span<const Queued>(gone, gpu.awaiting.end()));
    gpu.awaiting.erase(gone, gpu.awaiting.end());
    forgetMemory(gpu, client->id);
    gpu.channel->dropOpens(client->id);
    auto command = std::make_unique<ExecCommand>();
    command->kind = ExecCommand::Kind::kForget;
    command->client_id = client->id;
    gpu.channel->post(std::move(command));
  }
}

void Scheduler::onRelease(const ClientPtr& client, const std::uint64_t* alloc_ids,
                          std::size_t count) {
  for (Gpu& gpu : gpus_) {
    for (std::size_t i = 0; i < count; ++i)
      gpu.memory.erase(MemoryKey{client->id, alloc_ids[i]});
    auto command = std::make_unique<ExecCommand>();
    command->kind = ExecCommand::Kind::kRelease;
    command->client_id = client->id;
    command->alloc_ids.assign(alloc_ids, alloc_ids + count);
    gpu.channel->post(std::move(command));
  }
}

bool Scheduler::poll(std::uint64_t now_ns, std::uint64_t& wake_at_ns) {
  bool progressed = false;
  wake_at_ns = 0;
  for (Gpu& gpu : gpus_) {
    while (std::unique_ptr<Batch> done = gpu.channel->takeDone()) {
      if (done->launched_ns != 0 && done->taken_ns >= done->launched_ns &&
          done->submitted_ns >= done->taken_ns && done->seen_ns >= done->submitted_ns &&
          done->done_ns >= done->seen_ns) {
        const std::uint64_t items = done->items.size();
        gpu.round.completed += items;
        gpu.round.handoff_ns += items * (done->taken_ns - done->launched_ns);
        gpu.round.launch_ns += items * (done->submitted_ns - done->taken_ns);
        gpu.round.gpu_ns += items * (done->seen_ns - done->submitted_ns);
        gpu.round.publish_ns += items * (done->done_ns - done->seen_ns);
      }
      gpu.batcher.completed(*done, now_ns);
      settle(done->items);
      progressed = true;
    }
    progressed |= takeOpened(gpu);
    // What the executor closed on its own is opened by the mapper again at
    // its next use: taken for mapped, the executor opened it on its own
    // thread, every tenant's launches waiting (a tenant cycling through more
    // allocations than STMUX_MAX_MAPPINGS did so at every request).
    for (const auto& [client, alloc_id] : gpu.channel->takeGivenUp()) {
      if (auto it = gpu.memory.find(MemoryKey{client, alloc_id});
          it != gpu.memory.end() && it->second.mapped) {
        gpu.memory.erase(it);
      }
    }
    gpu.channel->flush();
    std::uint64_t wake = 0;
    progressed |= admitReady(gpu, now_ns, wake_at_ns);
    while (std::optional<Batch> batch = gpu.batcher.take(now_ns, wake)) {
      STMUX_TRACE(kSched, "gpu {}: batch {} of {} ({})", gpu.info.index, batch->id,
                  batch->items.size(), kLaunchReasonNames[static_cast<int>(batch->reason)]);
      auto command = std::make_unique<ExecCommand>();
      command->kind = ExecCommand::Kind::kRun;
      command->batch = std::make_unique<Batch>(std::move(batch).value());
      gpu.channel->post(std::move(command));
      progressed = true;
    }
    if (wake != 0 && (wake_at_ns == 0 || wake < wake_at_ns)) wake_at_ns = wake;
  }
  return progressed;
}

bool Scheduler::takesNotices() const {
  // Each notice is a command for every GPU's executor, posted at once; an
  // executor that takes none for a while (a long batch, an open on its own
  // thread) left a flood of them piling up here without bound.
  return std::all_of(gpus_.begin(), gpus_.end(), [](const Gpu& gpu) {
    return gpu.channel->commandBacklog() < kMostWaitingCommands;
  });
}

bool Scheduler::busy() const {
  return std::any_of(gpus_.begin(), gpus_.end(), [](const Gpu& gpu) {
    return gpu.batcher.queued() > 0 || gpu.batcher.inFlight() > 0 || gpu.channel->backlog() > 0;
  });
}

std::string Scheduler::mustEnd() const {
  // Each executor marks its GPU broken on its own thread: each flag is read
  // once, so that a GPU failing on MPS between two reads is not taken for
  // one that failed off it.
  std::size_t broken = 0;
  for (const Gpu& gpu : gpus_) {
    if (!gpu.channel->gauges().broken.load(std::memory_order_relaxed)) continue;
    if (gpu.info.mps) {
      return fmt::format(
          "GPU {} failed on MPS: the MPS server takes no new client until every client it "
          "faulted has exited, this daemon included",
          gpu.info.index);
    }
    ++broken;
  }
  // Off MPS a failed context is this process's alone: one started again
  // gets a new one. A daemon with a GPU still working stays up for it.
  if (!gpus_.empty() && broken == gpus_.size()) {
    return gpus_.size() == 1
               ? fmt::format(
                     "GPU {} failed, the only one this daemon serves: a daemon started "
                     "again has a new CUDA context on it",
                     gpus_.front().info.index)
               : fmt::format(
                     "all {} GPUs this daemon serves failed: a daemon started again has "
                     "new CUDA contexts on them",
                     gpus_.size());
  }
  return {};
}

void Scheduler::addStatus(Json& status) const {
  Json& gpus = status["gpus"] = Json::array();
  for (const Gpu& gpu : gpus_) {
    const BatcherStats& stats = gpu.batcher.stats();
    const ExecutorGauges& gauges = gpu.channel->gauges();
    Json& entry = gpus.emplace_back();
    entry["index"] = gpu.info.index;
    entry["uuid"] = formatUuid(gpu.info.uuid);
    entry["name"] = gpu.info.name;
    entry["mps"] = gpu.info.mps;
    entry["broken"] = gauges.broken.load();
    entry["queued"] = gpu.batcher.queued();
    entry["awaiting"] = gpu.awaiting.size();
    entry["opening"] = gpu.opening();
    entry["in_flight"] = gpu.batcher.inFlight();
    entry["requests"] = stats.requests;
    entry["batches"] = stats.batches;
    entry["mean_batch"] = stats.batches == 0 ? 0.0
                                             : static_cast<double>(stats.launched) /
                                                   static_cast<double>(stats.batches);
    entry["mean_wait_us"] = stats.launched == 0 ? 0.0
                                                : static_cast<double>(stats.wait_ns) / 1e3 /
                                                      static_cast<double>(stats.launched);
    Json& launches = entry["launches"] = Json::object();
    for (std::size_t i = 0; i < kLaunchReasonCount; ++i)
      launches[kLaunchReasonNames[i]] = stats.launches[i];
    const RoundTimes& r = gpu.round;
    auto mean = [](std::uint64_t ns, std::uint64_t n) {
      return n == 0 ? 0.0 : static_cast<double>(ns) / 1e3 / static_cast<double>(n);
    };
    Json& round = entry["round_us"] = Json::object();
    round["ring"] = mean(r.ring_ns, r.popped);
    round["stream_ready"] = mean(r.ready_ns, r.readied);
    round["batch_wait"] = mean(stats.wait_ns, stats.launched);
    round["handoff"] = mean(r.handoff_ns, r.completed);
    round["launch"] = mean(r.launch_ns, r.completed);
    round["gpu"] = mean(r.gpu_ns, r.completed);
    round["publish"] = mean(r.publish_ns, r.completed);
    // Per caller woken, not per request: from its batch seen done to its wake.
    const std::uint64_t wakes = gauges.wakes.load(std::memory_order_acquire);
    const std::uint64_t wake_ns = gauges.wake_ns.load(std::memory_order_relaxed);
    round["wake"] = mean(wake_ns, wakes);
    entry["wakes"] = wakes;
    // The same as sums and counts since start, so that a reader can take the
    // means over a span of its own (stmux-bench's timed span).
    Json& sums = entry["round_sums"] = Json::object();
    sums["popped"] = r.popped, sums["ring_ns"] = r.ring_ns;
    sums["readied"] = r.readied, sums["ready_ns"] = r.ready_ns;
    sums["launched"] = stats.launched, sums["wait_ns"] = stats.wait_ns;
    sums["batches"] = stats.batches;
    sums["completed"] = r.completed, sums["handoff_ns"] = r.handoff_ns;
    sums["launch_ns"] = r.launch_ns, sums["gpu_ns"] = r.gpu_ns, sums["publish_ns"] = r.publish_ns;
    sums["wakes"] = wakes, sums["wake_ns"] = wake_ns;
    entry["cublas_launches"] = gauges.launches.load();
    entry["epilogue_launches"] = gauges.epilogue_launches.load();
    entry["epilogue_copies"] = gauges.epilogue_copies.load();
    entry["pointer_copies"] = gauges.pointer_copies.load();
    entry["graph_launches"] = gauges.graph_launches.load();
    entry["graph_captures"] = gauges.graph_captures.load();
    entry["mapped"] = gauges.mapped.load();
    entry["inline_opens"] = gauges.inline_opens.load();
    entry["held_for_hazard"] = stats.held_for_hazard;
  }
}

void Scheduler::addMetrics(MetricsText& out) const {
  auto labels = [](const Gpu& gpu) {
    return Labels{{"gpu", std::to_string(gpu.info.index)},
                  {"uuid", formatUuid(gpu.info.uuid)},
                  {"name", gpu.info.name}};
  };
  auto perGpu = [&](std::string_view name, std::string_view type, std::string_view help,
                    auto&& value) {
    out.family(name, type, help);
    for (const Gpu& gpu : gpus_)
      out.sample(name, labels(gpu), static_cast<double>(value(gpu)));
  };
  perGpu("stmux_gpu_requests_total", "counter", "Valid requests queued for the GPU.",
         [](const Gpu& g) { return g.batcher.stats().requests; });
  perGpu("stmux_gpu_batches_total", "counter", "Batches launched on the GPU.",
         [](const Gpu& g) { return g.batcher.stats().batches; });
  perGpu("stmux_gpu_cublas_launches_total", "counter",
         "cuBLAS launches the batches took (a batch of several shapes takes several).",
         [](const Gpu& g) { return g.channel->gauges().launches.load(); });
  perGpu("stmux_gpu_epilogue_launches_total", "counter",
         "Epilogue kernels (bias, ReLU, GELU) the batches took: one per batch with any.",
         [](const Gpu& g) { return g.channel->gauges().epilogue_launches.load(); });
  perGpu("stmux_gpu_wakes_total", "counter",
         "Callers woken from a futex sleep on their completions (the others were still polling).",
         [](const Gpu& g) { return g.channel->gauges().wakes.load(); });
  perGpu("stmux_gpu_queued_requests", "gauge", "Requests waiting for a batch.",
         [](const Gpu& g) { return g.batcher.queued(); });
  perGpu("stmux_gpu_awaiting_requests", "gauge",
         "Requests waiting for their callers' streams to reach them (stream-ordered) or for "
         "their memory to be mapped.",
         [](const Gpu& g) { return g.awaiting.size(); });
  perGpu("stmux_gpu_batches_in_flight", "gauge", "Batches handed to the GPU, not yet done.",
         [](const Gpu& g) { return g.batcher.inFlight(); });
  perGpu("stmux_gpu_mapped_allocations", "gauge",
         "Client allocations the daemon holds mapped (the mapping cache).",
         [](const Gpu& g) { return g.channel->gauges().mapped.load(); });
  perGpu("stmux_gpu_opening_allocations", "gauge",
         "Client allocations the mapper thread is opening, their requests waiting.",
         [](const Gpu& g) { return g.opening(); });
  perGpu("stmux_gpu_inline_opens_total", "counter",
         "Allocations the executor had to open on its own thread (CUDA still answered "
         "'already mapped' to the mapper).",
         [](const Gpu& g) { return g.channel->gauges().inline_opens.load(); });
  perGpu("stmux_gpu_held_for_hazard_total", "counter",
         "Times a tenant's next request waited for a later batch because it writes what one "
         "of its requests in the batch touches, or the reverse.",
         [](const Gpu& g) { return g.batcher.stats().held_for_hazard; });
  perGpu("stmux_gpu_mps", "gauge",
         "1 where the daemon's context on the GPU runs under an MPS control daemon, else 0.",
         [](const Gpu& g) { return g.info.mps ? 1 : 0; });
  perGpu("stmux_gpu_broken", "gauge",
         "1 once a sticky CUDA error cost the daemon this GPU (its calls then run directly).",
         [](const Gpu& g) { return g.channel->gauges().broken.load() ? 1 : 0; });
  out.family("stmux_gpu_launches_total", "counter", "Batches launched, by what launched them.");
  for (const Gpu& gpu : gpus_) {
    for (std::size_t i = 0; i < kLaunchReasonCount; ++i) {
      Labels with_reason = labels(gpu);
      with_reason.emplace_back("reason", std::string(kLaunchReasonNames[i]));
      out.sample("stmux_gpu_launches_total", with_reason,
                 static_cast<double>(gpu.batcher.stats().launches[i]));
    }
  }
  out.family("stmux_batch_size", "histogram", "Requests per launched batch.");
  for (const Gpu& gpu : gpus_) {
    const BatcherStats& stats = gpu.batcher.stats();
    out.histogram("stmux_batch_size", labels(gpu), kBatchSizeBounds, stats.batch_sizes,
                  std::size(kBatchSizeBounds), static_cast<double>(stats.launched));
  }
  out.family("stmux_batch_wait_seconds", "histogram",
             "Each launched request's wait between its arrival and its batch's launch.");
  for (const Gpu& gpu : gpus_) {
    const BatcherStats& stats = gpu.batcher.stats();
    out.histogram("stmux_batch_wait_seconds", labels(gpu), kWaitBoundsS, stats.waits,
                  std::size(kWaitBoundsS), static_cast<double>(stats.wait_ns) / 1e9);
  }
}

}  // namespace stmux::daemon
