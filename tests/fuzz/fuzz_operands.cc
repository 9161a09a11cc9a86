// Fuzzes what the daemon does with a request's operand descriptors and sizes:
// cuBLAS's argument rules, each operand's extent and whether it fits its
// allocation (include/stmux/gemm.h), with any m, n, k, leading dimensions,
// epilogues, offsets and sizes, int64 extremes included; and the MappingCache
// (daemon/mapping_cache.cc), which keeps client allocations mapped keyed by
// the ids, bases and sizes a client claims.
//
// The arithmetic is checked against the same rules computed in 128 bits, and
// UBSan (built in, halting) watches every signed operation. The cache is
// checked for what would hurt the daemon: a mapping closed while a batch that
// used it may still run, a mapping closed twice or never, its counts wrong.
//
// Input: ops (kMaxSteps at most), each a u8 opcode and its arguments.
#include <cstdlib>
#include <map>
#include <optional>

#include "daemon/mapping_cache.h"
#include "stmux/gemm.h"
#include "stmux/log.h"
#include "tests/fuzz/fuzz_bytes.h"

namespace stmux::fuzz {
namespace {

using daemon::Mapped;
using daemon::MappingCache;

constexpr int kMaxSteps = 64;
constexpr std::uint32_t kClients = 3;

enum Step : std::uint8_t {
  kShape,      // a GEMM's arguments and its operands' placement
  kAcquire,    // the executor maps an operand for the current batch
  kNextBatch,  // the executor starts the next batch
  kComplete,   // batches complete, in order
  kRelease,    // the client says an allocation is gone
  kForget,     // the client detaches
  kSteps
};

using Int = __int128;

// ---- the rules, again, in 128 bits ----

std::optional<std::uint64_t> referenceBytes(std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  if (rows <= 0 || cols <= 0) return 0;
  // At most (2^63 - 1)^2 elements: no overflow in 128 bits.
  const Int elements = (Int{cols} - 1) * Int{ld} + Int{rows};
  if (elements > Int{INT64_MAX} / 4) return std::nullopt;
  return static_cast<std::uint64_t>(elements * 4);
}

bool referenceFits(std::uint64_t offset, std::uint64_t extent, std::uint64_t alloc) {
  if (extent == 0) return true;
  return offset % 4 == 0 && Int{offset} + Int{extent} <= Int{alloc};
}

void checkShape(ByteReader& in) {
  GemmShape s;
  s.transa = in.integer<std::int32_t>();
  s.transb = in.integer<std::int32_t>();
  s.m = in.integer<std::int64_t>();
  s.n = in.integer<std::int64_t>();
  s.k = in.integer<std::int64_t>();
  s.lda = in.integer<std::int64_t>();
  s.ldb = in.integer<std::int64_t>();
  s.ldc = in.integer<std::int64_t>();
  s.epilogue = in.u32();

  const bool ops_ok = (s.transa >= 0 && s.transa <= 2) && (s.transb >= 0 && s.transb <= 2);
  // Bias (1), ReLU (2), GELU (4), no other bit, not both activations.
  const bool epilogue_ok = s.epilogue <= 7 && (s.epilogue & 6) != 6;
  const bool valid = ops_ok && epilogue_ok && s.m >= 0 && s.n >= 0 && s.k >= 0 &&
                     s.lda >= std::max<std::int64_t>(1, s.rowsA()) &&
                     s.ldb >= std::max<std::int64_t>(1, s.rowsB()) &&
                     s.ldc >= std::max<std::int64_t>(1, s.m);
  const std::int32_t status = checkGemmArgs(s);
  STMUX_FUZZ_CHECK((status == kStatusSuccess) == valid);
  STMUX_FUZZ_CHECK(status == kStatusSuccess || status == kStatusInvalidValue);
  if (!valid) return;  // gemmExtents is defined for valid arguments only

  const auto extents = gemmExtents(s);
  const auto a = referenceBytes(s.rowsA(), s.colsA(), s.lda);
  const auto b = referenceBytes(s.rowsB(), s.colsB(), s.ldb);
  const auto c = referenceBytes(s.m, s.n, s.ldc);
  STMUX_FUZZ_CHECK(extents.has_value() == (a && b && c));
  if (!extents) return;
  STMUX_FUZZ_CHECK(extents->a == *a && extents->b == *b && extents->c == *c);
  // The bias: one float per row of C, read only with a bias and a C.
  const bool bias = (s.epilogue & 1) != 0 && s.m > 0 && s.n > 0;
  STMUX_FUZZ_CHECK(extents->bias == (bias ? static_cast<std::uint64_t>(s.m) * 4 : 0));

  // Each operand placed somewhere in an allocation of some size.
  const std::uint64_t sizes[4] = {extents->a, extents->b, extents->c, extents->bias};
  for (std::uint64_t extent : sizes) {
    const std::uint64_t offset = in.u64();
    const std::uint64_t alloc = in.u64();
    const bool fits = operandFits(offset, extent, alloc);
    STMUX_FUZZ_CHECK(fits == referenceFits(offset, extent, alloc));
    // What the executor then hands cuBLAS lies inside the allocation.
    if (fits && extent != 0) STMUX_FUZZ_CHECK(offset <= alloc && alloc - offset >= extent);
  }

  // The batch key of the same request is the same key, with the same hash.
  Request r{};
  r.transa = s.transa, r.transb = s.transb;
  r.m = s.m, r.n = s.n, r.k = s.k, r.lda = s.lda, r.ldb = s.ldb, r.ldc = s.ldc;
  r.epilogue = s.epilogue;
  const std::uint32_t alpha_bits = in.u32(), beta_bits = in.u32();
  std::memcpy(&r.alpha, &alpha_bits, sizeof(float));
  std::memcpy(&r.beta, &beta_bits, sizeof(float));
  const BatchKey key = BatchKey::of(r);
  STMUX_FUZZ_CHECK(key == BatchKey::of(r));
  STMUX_FUZZ_CHECK(BatchKeyHash{}(key) == BatchKeyHash{}(BatchKey::of(r)));
  STMUX_FUZZ_CHECK(key.alpha_bits == alpha_bits && key.beta_bits == beta_bits);
  // An epilogue has work wherever C has an element.
  if (s.epilogue != 0 && s.m > 0 && s.n > 0) STMUX_FUZZ_CHECK(!gemmIsNoOp(r));
}

// ---- the mapping cache ----

class CacheWorld {
 public:
  CacheWorld(std::size_t limit)
      : cache_(
            limit,
            [this](const IpcHandle& handle, bool& already_mapped) -> Result<Mapped> {
              // The fake driver: the handle's first byte says what happens.
              already_mapped = handle.bytes[0] == 1;
              if (handle.bytes[0] == 1 || handle.bytes[0] == 2) return Status::error("refused");
              std::uint64_t bytes;
              std::memcpy(&bytes, handle.bytes + 8, sizeof(bytes));
              const std::uint64_t base = next_base_++ << 40;
              opened_[base] = 0;
              return Mapped{base, bytes};
            },
            [this](const Mapped& mapped) {
              auto it = opened_.find(mapped.base);
              STMUX_FUZZ_CHECK(it != opened_.end());  // opened, and not closed already
              // Never while a batch that used it may still run.
              STMUX_FUZZ_CHECK(it->second <= completed_);
              opened_.erase(it);
            }) {}

  void acquire(ByteReader& in) {
    const std::uint32_t client = in.u8() % kClients;
    OperandDesc operand{};
    // Small ids and bases collide often; raw ones reach the extremes.
    const std::uint8_t how = in.u8();
    operand.alloc_id = (how & 1) != 0 ? in.u64() : in.u8();
    operand.base = (how & 2) != 0 ? in.u64() : std::uint64_t{in.u8()} << 12;
    operand.offset = in.u64();
    operand.alloc_bytes = (how & 4) != 0 ? in.u64() : std::uint64_t{in.u16()} << 4;
    operand.handle.bytes[0] = in.u8() % 4;
    operand.handle.bytes[1] = in.u8() % 4;  // which memory: a few distinct handles
    const std::uint64_t bytes = in.u64();
    std::memcpy(operand.handle.bytes + 8, &bytes, sizeof(bytes));
    auto mapped = cache_.acquire(client, operand, batch_);
    if (!mapped) return;
    auto it = opened_.find(mapped->base);
    STMUX_FUZZ_CHECK(it != opened_.end());  // what the cache hands out is open
    it->second = std::max(it->second, batch_);
  }

  void run(ByteReader& in, Step op) {
    switch (op) {
      case kAcquire:
        acquire(in);
        break;
      case kNextBatch:
        ++batch_;
        break;
      case kComplete:
        // Batches complete in order, and only those started.
        completed_ = std::min(batch_, completed_ + 1 + in.u8() % 4);
        cache_.batchCompleted(completed_);
        break;
      case kRelease:
        cache_.release(in.u8() % kClients, in.u8());
        break;
      case kForget:
        cache_.forgetClient(in.u8() % kClients);
        break;
      default:
        break;
    }
    std::size_t entries = 0;
    for (std::uint32_t client = 0; client < kClients; ++client)
      entries += cache_.clientSize(client);
    STMUX_FUZZ_CHECK(cache_.size() == entries);
    STMUX_FUZZ_CHECK(opened_.size() == entries + cache_.pendingCloses());
  }

  // Every batch done, every client gone: everything closed.
  void finish() {
    for (std::uint32_t client = 0; client < kClients; ++client)
      cache_.forgetClient(client);
    completed_ = batch_;
    cache_.batchCompleted(completed_);
    STMUX_FUZZ_CHECK(cache_.size() == 0 && cache_.pendingCloses() == 0);
    STMUX_FUZZ_CHECK(opened_.empty());
  }

 private:
  std::map<std::uint64_t, std::uint64_t> opened_;  // base -> last batch that used it
  std::uint64_t next_base_ = 1;
  std::uint64_t batch_ = 1;
  std::uint64_t completed_ = 0;
  MappingCache cache_;  // last: its destructor may still close through the maps above
};

// ---- seeds ----

void shape(ByteWriter& w, std::int32_t ta, std::int32_t tb, std::int64_t m, std::int64_t n,
           std::int64_t k, std::int64_t lda, std::int64_t ldb, std::int64_t ldc,
           std::uint32_t epilogue = 0) {
  w.u8(kShape).integer(ta).integer(tb).integer(m).integer(n).integer(k);
  w.integer(lda).integer(ldb).integer(ldc).u32(epilogue);
  for (int i = 0; i < 4; ++i)
    w.u64(16).u64(1 << 20);
  w.u32(0x3f800000).u32(0);
}

void acquire(ByteWriter& w, std::uint8_t client, std::uint8_t id, std::uint8_t base,
             std::uint16_t bytes16, std::uint8_t handle) {
  w.u8(kAcquire).u8(client).u8(0).u8(id).u8(base).u64(0).u16(bytes16).u8(0).u8(handle);
  w.u64(std::uint64_t{bytes16} << 4);
}

void writeSeeds(const char* dir) {
  {
    ByteWriter w;  // ordinary shapes, then the int64 edges
    w.u8(4);
    shape(w, kOpN, kOpN, 64, 64, 64, 64, 64, 64);
    shape(w, kOpT, kOpC, 3, 5, 7, 7, 5, 3);
    shape(w, kOpN, kOpN, INT64_MAX, 1, 1, INT64_MAX, 1, INT64_MAX);
    shape(w, kOpN, kOpT, 1, INT64_MAX / 4, 1, 1, INT64_MAX / 4, 1);
    shape(w, kOpN, kOpN, 0, 0, 0, 1, 1, 1);
    shape(w, kOpN, kOpN, 64, 64, 64, 64, 64, 64, kEpilogueBias | kEpilogueGelu);
    shape(w, kOpN, kOpN, 64, 64, 64, 64, 64, 64, kEpilogueRelu | kEpilogueGelu);  // refused
    writeSeed(dir, "shapes", w.data());
  }
  {
    ByteWriter w;  // mappings used by batches, a reused base, a release, a detach
    w.u8(2);
    acquire(w, 0, 1, 1, 64, 0);
    acquire(w, 0, 2, 2, 64, 3);
    w.u8(kNextBatch);
    acquire(w, 0, 3, 1, 64, 0);  // a new allocation where the first was: it was freed
    acquire(w, 1, 1, 1, 64, 0);  // another client's id 1
    w.u8(kComplete).u8(0).u8(kRelease).u8(0).u8(2).u8(kForget).u8(1);
    acquire(w, 0, 4, 9, 64, 1);  // the driver says: mapped already
    writeSeed(dir, "cache", w.data());
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
  CacheWorld cache(1 + in.u8() % 4);  // the per-client limit
  for (int op = 0; op < kMaxSteps && !in.empty(); ++op) {
    const auto code = static_cast<Step>(in.u8() % kSteps);
    if (code == kShape) {
      checkShape(in);
    } else {
      cache.run(in, code);
    }
  }
  cache.finish();
  return 0;
}
