// Fuzzes what the daemon reads from a tenant's segment: the ring's cells and
// sequence words, the request descriptors in them and the completion slots,
// all of which the tenant owns and may write at any time. The input is a
// script run against the daemon's own code on one thread, with a fake clock:
// RingConsumer pops (with the server's slot check, daemon/server.cc), the
// Scheduler validates and routes (daemon/scheduler.cc), its Batchers decide
// (daemon/batcher.cc), and a fake executor per GPU does what
// daemon/executor.cc does minus CUDA: opens the allocations the scheduler
// asks its mapper for, adopts them into the real MappingCache
// (daemon/mapping_cache.cc; the "driver" reports the size the handle's first
// 8 bytes name), maps each operand through it, checks it with operandFits,
// claims and completes.
//
// Checked: no read outside the segments (each is one heap block, so ASan sees
// a stray access), the consumer pops at most a ring's capacity without new
// writes, every request that reaches a batcher has valid arguments and
// described operands, everything queued is finished once the clock runs on
// (no request is stuck, no client's count of outstanding requests is left
// above zero), and every mapping opened is closed exactly once.
//
// Input: u8 tenants-and-slots, u8 batcher options, then ops (kMaxSteps at most),
// each a u8 opcode and its arguments (see LLVMFuzzerTestOneInput).
#include <cstdlib>
#include <map>
#include <set>

#include "daemon/mapping_cache.h"
#include "daemon/scheduler.h"
#include "stmux/gemm.h"
#include "stmux/log.h"
#include "stmux/segment.h"
#include "tests/fuzz/fuzz_bytes.h"

namespace stmux::fuzz {
namespace {

using daemon::Batch;
using daemon::ClientPtr;
using daemon::ExecCommand;
using daemon::ExecutorChannel;
using daemon::Mapped;
using daemon::MappingCache;
using daemon::Queued;

constexpr int kMaxSteps = 96;
constexpr int kMaxTenants = 3;
constexpr int kBurst = 64;  // the server's requests per client per turn
constexpr std::uint64_t kStart = 1'000'000'000'000;

enum Step : std::uint8_t {
  kWriteCell,  // a request into a cell, published or not
  kScribble,   // raw bytes anywhere in the segment
  kDrain,      // the server's turn at one client's ring
  kAdvance,    // the clock moves; the scheduler polls
  kExecute,    // one GPU's executor runs what it was sent
  kRelease,    // a release message (as the server passes it on)
  kDetach,     // the client goes; a new one takes its place
  kCancel,     // the client gives up on a slot
  kBreak,      // a GPU fails
  kSteps
};

Uuid gpuUuid(int gpu) {
  Uuid uuid{};
  std::memset(uuid.bytes, gpu, sizeof(uuid.bytes));  // GPU 0's UUID is all zeros
  return uuid;
}

// The allocation size the fake driver reports: the handle's first 8 bytes.
std::uint64_t driverBytes(const IpcHandle& handle) {
  std::uint64_t bytes;
  std::memcpy(&bytes, handle.bytes, sizeof(bytes));
  return bytes;
}

// A valid request, for the seeds and the template ops: 4x4 SGEMM on GPU 0.
Request validRequest() {
  Request r{};
  r.op = static_cast<std::uint32_t>(Op::kSgemm);
  r.transa = kOpN;
  r.transb = kOpT;
  r.m = r.n = r.k = 4;
  r.lda = r.ldb = r.ldc = 4;
  r.alpha = 1.0f;
  r.beta = 0.0f;
  r.device = gpuUuid(0);
  OperandDesc* operands[] = {&r.a, &r.b, &r.c};
  for (std::uint64_t i = 0; i < 3; ++i) {
    operands[i]->alloc_id = i + 1;
    operands[i]->base = 0x7000'0000'0000 + i * 0x10000;
    operands[i]->alloc_bytes = 64;
    const std::uint64_t bytes = 64;
    std::memcpy(operands[i]->handle.bytes, &bytes, sizeof(bytes));
    operands[i]->handle.bytes[8] = static_cast<std::uint8_t>(i);
  }
  return r;
}

struct FreeBlock {
  void operator()(void* block) const { std::free(block); }
};

struct Tenant {
  SegmentLayout layout;
  void* memory = nullptr;  // the current client's segment
  ClientPtr client;
};

class FakeExecutor {
 public:
  explicit FakeExecutor(ExecutorChannel& channel)
      : channel_(channel),
        cache_(
            4,
            [this](const IpcHandle& handle, bool& already_mapped) {
              return open(handle, already_mapped);
            },
            [this](const Mapped& mapped) { close(mapped); }) {}

  // Everything waiting in the channel, as daemon/executor.cc and its mapper
  // handle it. Whether there was anything.
  bool runAll() {
    bool any = false;
    while (std::unique_ptr<daemon::OpenJob> job = channel_.takeOpen()) {
      any = true;
      auto opened = open(job->operand.handle, job->already_mapped);
      job->ok = opened.ok();
      if (opened) job->mapped = opened.value();
      channel_.finishOpen(std::move(job));
    }
    while (std::unique_ptr<ExecCommand> command = channel_.takeCommand()) {
      any = true;
      switch (command->kind) {
        case ExecCommand::Kind::kRun:
          launch(std::move(command->batch));
          break;
        case ExecCommand::Kind::kAdopt:
          if (!cache_.adopt(command->client_id, command->operand, command->mapped)) {
            close(command->mapped);
          }
          break;
        case ExecCommand::Kind::kClose:
          close(command->mapped);
          break;
        case ExecCommand::Kind::kRelease:
          for (std::uint64_t id : command->alloc_ids)
            cache_.release(command->client_id, id);
          break;
        case ExecCommand::Kind::kForget:
          cache_.forgetClient(command->client_id);
          break;
      }
    }
    return any;
  }

  // After every client is forgotten: nothing may stay open.
  void checkAllClosed(const std::vector<std::uint32_t>& clients) {
    for (std::uint32_t id : clients)
      cache_.forgetClient(id);
    cache_.batchCompleted(UINT64_MAX);
    STMUX_FUZZ_CHECK(cache_.size() == 0);
    STMUX_FUZZ_CHECK(open_.empty());
  }

 private:
  Result<Mapped> open(const IpcHandle& handle, bool& already_mapped) {
    already_mapped = false;
    const std::uint64_t bytes = driverBytes(handle);
    if (bytes == 0) return Status::error("no such allocation");
    const std::uint64_t base = next_base_;
    next_base_ += 1ull << 40;
    STMUX_FUZZ_CHECK(open_.insert(base).second);
    return Mapped{base, bytes};
  }
  void close(const Mapped& mapped) {
    STMUX_FUZZ_CHECK(open_.erase(mapped.base) == 1);  // closed once, and opened
  }

  std::int32_t resolve(const Queued& item, const OperandDesc& operand, std::uint64_t extent,
                       std::uint64_t batch_id) {
    if (extent == 0) return kStatusSuccess;
    auto mapped = cache_.acquire(item.client->id, operand, batch_id);
    if (!mapped) return kStatusDeclined;
    if (!operandFits(operand.offset, extent, mapped->bytes)) return kStatusInvalidValue;
    // What the executor hands cuBLAS: inside the mapping, all of it.
    STMUX_FUZZ_CHECK(operand.offset <= mapped->bytes && extent <= mapped->bytes - operand.offset);
    return kStatusSuccess;
  }

  void launch(std::unique_ptr<Batch> batch) {
    for (const Queued& item : batch->items) {
      const Request& r = item.request;
      Slot& slot = item.client->view.slot(r.slot);  // the server checked the index
      if (channel_.gauges().broken.load()) {
        slotComplete(slot, r.generation, kStatusDeclined);
        continue;
      }
      if (item.client->gone.load()) continue;
      // The scheduler let only valid, described requests through.
      const GemmShape shape = GemmShape::of(r);
      STMUX_FUZZ_CHECK(checkGemmArgs(shape) == kStatusSuccess);
      const auto extents = gemmExtents(shape);
      STMUX_FUZZ_CHECK(extents.has_value());
      STMUX_FUZZ_CHECK(r.c.alloc_id != 0);
      STMUX_FUZZ_CHECK(extents->a == 0 || r.a.alloc_id != 0);
      STMUX_FUZZ_CHECK(extents->b == 0 || r.b.alloc_id != 0);
      STMUX_FUZZ_CHECK(extents->bias == 0 || r.bias.alloc_id != 0);
      STMUX_FUZZ_CHECK(item.key == BatchKey::of(r));
      std::int32_t status = resolve(item, r.a, extents->a, batch->id);
      if (status == kStatusSuccess) status = resolve(item, r.b, extents->b, batch->id);
      if (status == kStatusSuccess) status = resolve(item, r.c, extents->c, batch->id);
      if (status == kStatusSuccess) status = resolve(item, r.bias, extents->bias, batch->id);
      if (status != kStatusSuccess) {
        slotComplete(slot, r.generation, status);
        continue;
      }
      if (slotClaim(slot, r.generation)) slotComplete(slot, r.generation, kStatusSuccess);
    }
    cache_.batchCompleted(batch->id);
    channel_.finish(std::move(batch));
  }

  ExecutorChannel& channel_;
  std::set<std::uint64_t> open_;
  std::uint64_t next_base_ = 1ull << 40;
  MappingCache cache_;
};

class World {
 public:
  World(int tenants, std::uint32_t slots, daemon::BatcherOptions options)
      : channels_{ExecutorChannel(-1), ExecutorChannel(-1)},
        scheduler_(
            options,
            {daemon::GpuInfo{0, gpuUuid(0), "fuzz0"}, daemon::GpuInfo{1, gpuUuid(1), "fuzz1"}},
            {&channels_[0], &channels_[1]}),
        executors_{FakeExecutor(channels_[0]), FakeExecutor(channels_[1])} {
    for (int i = 0; i < tenants; ++i) {
      Tenant& tenant = tenants_.emplace_back();
      tenant.layout = SegmentLayout::compute(slots);
      attach(tenant);
    }
  }

  void run(ByteReader& in) {
    for (int op = 0; op < kMaxSteps && !in.empty(); ++op) {
      const auto code = static_cast<Step>(in.u8() % kSteps);
      Tenant& tenant = tenants_[in.u8() % tenants_.size()];
      switch (code) {
        case kWriteCell:
          writeCell(tenant, in);
          break;
        case kScribble: {
          const std::size_t offset = in.u32() % tenant.layout.total_bytes;
          const auto bytes = in.chunk(tenant.layout.total_bytes - offset);
          if (!bytes.empty()) {
            std::memcpy(static_cast<std::uint8_t*>(tenant.memory) + offset, bytes.data(),
                        bytes.size());
          }
          break;
        }
        case kDrain:
          drain(tenant);
          break;
        case kAdvance:
          now_ += in.u32();
          (void)poll();
          break;
        case kExecute:
          executors_[in.u8() & 1].runAll();
          break;
        case kRelease: {
          // The server passes on at most kMaxReleaseIds.
          std::uint64_t ids[kMaxReleaseIds];
          const std::size_t count = in.u8() % (kMaxReleaseIds + 1);
          for (std::size_t i = 0; i < count; ++i)
            ids[i] = in.u8();  // small ids: they name mapped allocations
          scheduler_.onRelease(tenant.client, ids, count);
          break;
        }
        case kDetach:
          tenant.client->gone.store(true);
          scheduler_.onDetach(tenant.client);
          attach(tenant);
          break;
        case kCancel: {
          Slot& slot = tenant.client->view.slot(in.u8() % tenant.layout.slot_count);
          (void)slotCancel(slot, slotGeneration(slot.word.load()));
          break;
        }
        case kBreak:
          channels_[in.u8() & 1].gauges().broken.store(true);
          break;
        default:
          break;
      }
    }
    finish();
  }

 private:
  // A new client with a segment of its own. One heap block per segment,
  // exactly its size, so ASan sees any access past it; a detached client's
  // block lives on, as its mapping does in the daemon while batches hold it.
  void attach(Tenant& tenant) {
    tenant.memory = blocks_.emplace_back(std::aligned_alloc(4096, tenant.layout.total_bytes)).get();
    std::memset(tenant.memory, 0, tenant.layout.total_bytes);
    auto client = std::make_shared<daemon::Client>();
    client->id = next_id_++;
    client->name = "fuzz";
    initSegment(tenant.memory, tenant.layout, client->id);
    client->view = SegmentView(tenant.memory, tenant.layout);
    client->ring = RingConsumer<Request>(client->view.cells(), tenant.layout.ring_capacity);
    tenant.client = std::move(client);
    ids_.push_back(tenant.client->id);
  }

  // op, tenant, u8 how, then a request: from the valid template or zeros,
  // with a chunk of bytes written over it at an offset.
  void writeCell(Tenant& tenant, ByteReader& in) {
    const std::uint8_t how = in.u8();
    const std::uint32_t capacity = tenant.layout.ring_capacity;
    Request request = (how & 1) != 0 ? validRequest() : Request{};
    const std::size_t offset = in.u16() % sizeof(Request);
    const auto bytes = in.chunk(sizeof(Request) - offset);
    if (!bytes.empty()) {
      std::memcpy(reinterpret_cast<std::uint8_t*>(&request) + offset, bytes.data(), bytes.size());
    }
    if ((how & 2) != 0) {
      // As the client would: a slot armed for it.
      request.slot %= tenant.layout.slot_count;
      request.generation = slotArm(tenant.client->view.slot(request.slot));
    }
    std::uint64_t position = tenant.client->ring.position();
    std::uint64_t seq;
    switch ((how >> 2) & 3) {
      case 0:  // published at the head, as a producer would
        seq = position + 1;
        break;
      case 1:  // published a few places on
        position += in.u8() % capacity;
        seq = position + 1;
        break;
      case 2:  // any sequence, any cell
        position = in.u32();
        seq = in.u64();
        break;
      default:  // at the head, with a sequence slightly off
        seq = position + 1 + static_cast<std::int8_t>(in.u8());
        break;
    }
    RingCell<Request>& cell = tenant.client->view.cells()[position % capacity];
    std::memcpy(static_cast<void*>(&cell.value), &request, sizeof(request));
    cell.seq.store(seq, std::memory_order_release);
  }

  // The server's drainRings() for one client, until the ring is empty.
  bool drain(Tenant& tenant) {
    const ClientPtr& client = tenant.client;
    const std::uint64_t before = client->ring.position();
    Request request;
    bool any = false;
    for (int burst = 0; burst < 4 * kBurst && client->ring.tryPop(request); ++burst) {
      any = true;
      if (request.slot >= tenant.layout.slot_count) continue;  // the server drops these
      scheduler_.onRequest(client, request, now_);
    }
    // Nothing written since: no cell can be published twice in a row.
    STMUX_FUZZ_CHECK(client->ring.position() - before <= tenant.layout.ring_capacity);
    return any;
  }

  bool poll() {
    std::uint64_t wake = 0;
    const bool progressed = scheduler_.poll(now_, wake);
    STMUX_FUZZ_CHECK(wake == 0 || wake > now_);
    return progressed;
  }

  // The clock runs on and the executors keep up: everything queued must be
  // launched, run and handed back.
  void finish() {
    constexpr int kRounds = 1000;
    int round = 0;
    for (; round < kRounds; ++round) {
      bool progressed = false;
      for (Tenant& tenant : tenants_)
        progressed |= drain(tenant);
      now_ += 50'000;
      progressed |= poll();
      for (FakeExecutor& executor : executors_)
        progressed |= executor.runAll();
      if (!progressed && !scheduler_.busy()) break;
    }
    // It settles: nothing the tenants wrote keeps the daemon working (the
    // mapper opening, batches launching) for ever.
    STMUX_FUZZ_CHECK(round < kRounds);
    STMUX_FUZZ_CHECK(!scheduler_.busy());
    // Stream-ordered requests whose streams never said ready are still
    // outstanding, as a tenant's whose stream is stuck stay: its own places,
    // until it leaves. Everything else is done, so once the tenants leave
    // nothing may be outstanding: no client is left held to fewer slots.
    for (Tenant& tenant : tenants_) {
      tenant.client->gone.store(true);
      scheduler_.onDetach(tenant.client);
    }
    // Twice: what the mappers opened for clients now gone comes back to the
    // scheduler, which has the executors close it.
    for (int pass = 0; pass < 2; ++pass) {
      for (FakeExecutor& executor : executors_)
        executor.runAll();
      (void)poll();
    }
    for (const Tenant& tenant : tenants_)
      STMUX_FUZZ_CHECK(tenant.client->outstanding == 0);
    for (FakeExecutor& executor : executors_)
      executor.checkAllClosed(ids_);
  }

  std::vector<std::unique_ptr<void, FreeBlock>> blocks_;  // destroyed last
  std::uint64_t now_ = kStart;
  std::uint32_t next_id_ = 1;
  std::vector<std::uint32_t> ids_;
  ExecutorChannel channels_[2];
  daemon::Scheduler scheduler_;
  FakeExecutor executors_[2];
  std::vector<Tenant> tenants_;
};

// ---- seeds ----

void cell(ByteWriter& w, std::uint8_t tenant, const Request& request) {
  w.u8(kWriteCell).u8(tenant).u8(1 | 2).u16(0).chunkOf(request);
}

void writeSeeds(const char* dir) {
  const std::uint8_t two_tenants_eight_slots = (1 << 4) | 3;
  const std::uint8_t batch_of_four = 3;
  {
    ByteWriter w;  // two tenants, a request each, batched, run
    w.u8(two_tenants_eight_slots).u8(batch_of_four);
    cell(w, 0, validRequest());
    Request with_bias = validRequest();  // an epilogue, its bias described
    with_bias.epilogue = kEpilogueBias | kEpilogueGelu;
    with_bias.bias = with_bias.c;
    with_bias.bias.alloc_id = 4;
    with_bias.bias.handle.bytes[8] = 3;
    cell(w, 1, with_bias);
    w.u8(kDrain).u8(0).u8(kDrain).u8(1);
    w.u8(kAdvance).u8(0).u32(30'000).u8(kExecute).u8(0).u8(0);
    writeSeed(dir, "two-tenants", w.data());
  }
  {
    ByteWriter w;  // a request of each kind the scheduler rejects
    w.u8(two_tenants_eight_slots).u8(batch_of_four);
    Request r = validRequest();
    r.lda = 1;  // too small
    cell(w, 0, r);
    r = validRequest();
    r.m = INT64_MAX / 2;  // an extent past 2^63
    r.lda = INT64_MAX;
    cell(w, 0, r);
    r = validRequest();
    r.device.bytes[3] = 9;  // a GPU not served
    cell(w, 0, r);
    r = validRequest();
    r.c.alloc_id = 0;  // C not described
    cell(w, 0, r);
    r = validRequest();
    r.beta = 1.0f, r.k = 0;  // a no-op
    cell(w, 0, r);
    r = validRequest();
    r.epilogue = kEpilogueBias;  // a bias not described
    cell(w, 0, r);
    r = validRequest();
    r.epilogue = kEpilogueRelu | kEpilogueGelu;  // two activations
    cell(w, 0, r);
    w.u8(kDrain).u8(0);
    writeSeed(dir, "rejects", w.data());
  }
  {
    ByteWriter w;  // an operand past its allocation, a release, a detach
    w.u8(two_tenants_eight_slots).u8(batch_of_four);
    Request r = validRequest();
    r.b.offset = 8;
    cell(w, 1, r);
    cell(w, 1, validRequest());
    w.u8(kDrain).u8(1).u8(kAdvance).u8(0).u32(1'000'000).u8(kExecute).u8(0).u8(0);
    w.u8(kRelease).u8(1).u8(2).u8(1).u8(2).u8(kDetach).u8(1);
    writeSeed(dir, "release-detach", w.data());
  }
  {
    // Two requests describing allocations 1 and 2 two ways (a byte of their
    // handles that the fake driver's size does not read), from a start where
    // 1 is mapped as the second has it and 2 as the first: without a bound
    // on a request's opens they unmapped each other's for ever.
    const auto describing = [](std::uint8_t first, std::uint8_t second, std::uint32_t slot) {
      Request r = validRequest();
      r.a.handle.bytes[9] = first;
      r.b.handle.bytes[9] = second;
      r.slot = slot;
      return r;
    };
    ByteWriter w;
    w.u8(3).u8(batch_of_four);  // one tenant, eight slots
    cell(w, 0, describing(2, 1, 0));
    w.u8(kDrain).u8(0);
    for (int i = 0; i < 3; ++i)
      w.u8(kAdvance).u8(0).u32(30'000).u8(kExecute).u8(0).u8(0);
    cell(w, 0, describing(1, 1, 1));
    w.u8(kDrain).u8(0);
    cell(w, 0, describing(2, 2, 2));
    w.u8(kDrain).u8(0);
    writeSeed(dir, "fight", w.data());
  }
  {
    ByteWriter w;  // a scribbled ring: a forged sequence and raw bytes
    w.u8(two_tenants_eight_slots).u8(batch_of_four);
    cell(w, 0, validRequest());
    w.u8(kWriteCell).u8(0).u8(1 | (2 << 2)).u16(0).chunk(nullptr, 0).u32(5).u64(6);
    const std::uint8_t junk[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
    w.u8(kScribble).u8(0).u32(sizeof(SegmentHeader)).chunk(junk, sizeof(junk));
    w.u8(kCancel).u8(0).u8(0).u8(kDrain).u8(0).u8(kBreak).u8(0).u8(0);
    writeSeed(dir, "scribbled", w.data());
  }
}

}  // namespace
}  // namespace stmux::fuzz

using namespace stmux;
using namespace stmux::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  startTarget(writeSeeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  const std::uint8_t shape = in.u8();
  const int tenants = 1 + (shape >> 4) % kMaxTenants;
  const std::uint32_t slots = 1u << (shape & 3);  // 1 to 8: small rings wrap often
  const std::uint8_t batching = in.u8();
  daemon::BatcherOptions options;
  options.max_batch = 1 + (batching & 7);
  options.max_in_flight = 1 + ((batching >> 3) & 1);
  options.window_ns = (batching & 0x10) != 0 ? 1'000'000 : 20'000;
  World world(tenants, slots, options);
  world.run(in);
  return 0;
}
