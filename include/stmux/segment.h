// A client's shared-memory segment: header, request ring, completion slots.
//
//   [SegmentHeader][RingHeader][RingCell<Request> x ring_capacity][Slot x slot_count]
//
// The daemon creates it (a sealed memfd) and hands it to exactly one client
// over that client's control socket; nothing names it, so no other process
// can open it. The slot protocol below is the only code that changes a slot's
// state word, on either side.
#pragma once

#include <fmt/format.h>

#include <sched.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "stmux/ring.h"
#include "stmux/status.h"
#include "stmux/sys.h"
#include "stmux/wire.h"

namespace stmux {

struct SegmentLayout {
  std::uint32_t ring_capacity = 0;
  std::uint32_t slot_count = 0;
  std::size_t ring_offset = 0;
  std::size_t cells_offset = 0;
  std::size_t slots_offset = 0;
  std::size_t total_bytes = 0;

  static SegmentLayout compute(std::uint32_t slot_count) {
    auto roundUp = [](std::size_t n) { return (n + 4095) / 4096 * 4096; };
    SegmentLayout layout;
    layout.slot_count = slot_count;
    // Twice the slots: a cancelled request's stale entry may still sit in the
    // ring after its slot has been reused.
    layout.ring_capacity = slot_count * 2;
    layout.ring_offset = sizeof(SegmentHeader);
    layout.cells_offset = layout.ring_offset + sizeof(RingHeader);
    layout.slots_offset =
        layout.cells_offset + sizeof(RingCell<Request>) * std::size_t{layout.ring_capacity};
    layout.total_bytes = roundUp(layout.slots_offset + sizeof(Slot) * std::size_t{slot_count});
    return layout;
  }
};

// Typed views of a mapped segment. Holds no ownership.
class SegmentView {
 public:
  SegmentView() = default;
  SegmentView(void* base, const SegmentLayout& layout)
      : base_(static_cast<std::byte*>(base)), layout_(layout) {}

  SegmentHeader* header() const { return reinterpret_cast<SegmentHeader*>(base_); }
  RingHeader* ringHeader() const {
    return reinterpret_cast<RingHeader*>(base_ + layout_.ring_offset);
  }
  RingCell<Request>* cells() const {
    return reinterpret_cast<RingCell<Request>*>(base_ + layout_.cells_offset);
  }
  Slot* slots() const { return reinterpret_cast<Slot*>(base_ + layout_.slots_offset); }
  Slot& slot(std::uint32_t index) const { return slots()[index]; }
  const SegmentLayout& layout() const { return layout_; }

 private:
  std::byte* base_ = nullptr;
  SegmentLayout layout_;
};

// Daemon side: lays out a fresh segment in `base` (zero-filled memory).
inline void initSegment(void* base, const SegmentLayout& layout, std::uint32_t client_id) {
  auto* header = new (base) SegmentHeader{};
  header->magic = kSegmentMagic;
  header->version = kProtocolVersion;
  header->header_bytes = sizeof(SegmentHeader);
  header->request_bytes = sizeof(Request);
  header->slot_bytes = sizeof(Slot);
  header->ring_capacity = layout.ring_capacity;
  header->slot_count = layout.slot_count;
  header->client_id = client_id;
  header->ring_offset = layout.ring_offset;
  header->slots_offset = layout.slots_offset;
  header->total_bytes = layout.total_bytes;
  SegmentView view(base, layout);
  ringInit(view.ringHeader(), view.cells(), layout.ring_capacity);
  for (std::uint32_t i = 0; i < layout.slot_count; ++i)
    new (&view.slot(i)) Slot{};
  std::atomic_thread_fence(std::memory_order_release);
}

// Client side: checks a segment the daemon handed over against what this
// build of the shim understands and against the welcome message. Refuses on
// any mismatch rather than guess.
inline Result<SegmentLayout> checkSegment(const void* base, std::size_t mapped_bytes,
                                          std::uint32_t welcome_slots,
                                          std::uint32_t welcome_client_id) {
  if (mapped_bytes < sizeof(SegmentHeader)) {
    return Status::error(fmt::format("segment of {} bytes is smaller than its header ({})",
                                     mapped_bytes, sizeof(SegmentHeader)));
  }
  const auto* header = static_cast<const SegmentHeader*>(base);
  if (header->magic != kSegmentMagic) {
    return Status::error(
        fmt::format("segment magic is {:#x}, expected {:#x}", header->magic, kSegmentMagic));
  }
  if (header->version != kProtocolVersion) {
    return Status::error(fmt::format("segment speaks protocol {}, this library speaks {}",
                                     header->version, kProtocolVersion));
  }
  const std::uint32_t slots = header->slot_count;
  if (slots == 0 || (slots & (slots - 1)) != 0 || slots != welcome_slots) {
    return Status::error(
        fmt::format("segment has {} slots, the daemon announced {}", slots, welcome_slots));
  }
  const SegmentLayout expected = SegmentLayout::compute(slots);
  if (header->header_bytes != sizeof(SegmentHeader) || header->request_bytes != sizeof(Request) ||
      header->slot_bytes != sizeof(Slot) || header->ring_capacity != expected.ring_capacity ||
      header->ring_offset != expected.ring_offset ||
      header->slots_offset != expected.slots_offset ||
      header->total_bytes != expected.total_bytes || header->client_id != welcome_client_id) {
    return Status::error(fmt::format(
        "segment layout (header {} B, request {} B, slot {} B, ring {}, total {} B, client {}) "
        "differs from this library's (header {} B, request {} B, slot {} B, ring {}, total {} B, "
        "client {})",
        header->header_bytes, header->request_bytes, header->slot_bytes, header->ring_capacity,
        header->total_bytes, header->client_id, sizeof(SegmentHeader), sizeof(Request),
        sizeof(Slot), expected.ring_capacity, expected.total_bytes, welcome_client_id));
  }
  if (mapped_bytes < expected.total_bytes) {
    return Status::error(fmt::format("segment is {} bytes, its layout needs {}", mapped_bytes,
                                     expected.total_bytes));
  }
  return expected;
}

// ---- the slot protocol -------------------------------------------------------

// Client: marks a slot pending for a new request and returns its generation.
inline std::uint32_t slotArm(Slot& slot) {
  const std::uint32_t previous = slot.word.load(std::memory_order_relaxed);
  const std::uint32_t generation = (slotGeneration(previous) + 1) & kGenerationMask;
  slot.status.store(kStatusInternalError, std::memory_order_relaxed);
  slot.word.store(slotWord(generation, SlotState::kPending), std::memory_order_release);
  return generation;
}

// Client: gives up on a request the daemon has not claimed. False when the
// daemon already claimed it (running or done).
inline bool slotCancel(Slot& slot, std::uint32_t generation) {
  std::uint32_t expected = slotWord(generation, SlotState::kPending);
  return slot.word.compare_exchange_strong(expected, slotWord(generation, SlotState::kCancelled),
                                           std::memory_order_acq_rel);
}

// Daemon: whether the request of `generation` still waits in the slot (its
// caller has not given up on it), as far as one look can tell.
inline bool slotPending(const Slot& slot, std::uint32_t generation) {
  return slot.word.load(std::memory_order_acquire) == slotWord(generation, SlotState::kPending);
}

// Daemon: claims a request before it may touch the caller's memory. False when
// the client cancelled it, or the slot has moved on to another request.
inline bool slotClaim(Slot& slot, std::uint32_t generation) {
  std::uint32_t expected = slotWord(generation, SlotState::kPending);
  return slot.word.compare_exchange_strong(expected, slotWord(generation, SlotState::kRunning),
                                           std::memory_order_acq_rel);
}

// Daemon: publishes a status for a request it claimed (kRunning) or rejects
// unclaimed (kPending, e.g. failed validation). Does nothing if the slot no
// longer holds that request. An unclaimed request is claimed first: until
// then the client may cancel it and arm the slot for its next request at any
// moment, and a status stored meanwhile would be read as that request's
// (transport_test's rejection race). True when the waiter may be asleep and
// needs slotWake(): a batch publishes every slot first and wakes sleepers
// after, so callers still spinning see their completion without waiting
// behind other callers' system calls.
inline bool slotPublish(Slot& slot, std::uint32_t generation, std::int32_t status) {
  const std::uint32_t running = slotWord(generation, SlotState::kRunning);
  std::uint32_t word = slotWord(generation, SlotState::kPending);
  if (!slot.word.compare_exchange_strong(word, running, std::memory_order_acq_rel) &&
      word != running) {
    return false;  // cancelled, or another request's by now
  }
  // The slot is this publisher's: the client cannot cancel a running request.
  slot.status.store(status, std::memory_order_relaxed);
  slot.done_ns.store(nowNs(), std::memory_order_relaxed);
  // seq_cst pairs with the waiter's store to sleepers and load of word.
  std::uint32_t claimed = running;
  if (!slot.word.compare_exchange_strong(claimed, slotWord(generation, SlotState::kDone),
                                         std::memory_order_seq_cst)) {
    return false;
  }
  return slot.sleepers.load(std::memory_order_seq_cst) != 0;
}

inline void slotWake(Slot& slot) {
  futexWake(&slot.word);
}

inline void slotComplete(Slot& slot, std::uint32_t generation, std::int32_t status) {
  if (slotPublish(slot, generation, status)) slotWake(slot);
}

inline bool streamOrdered(const Request& request) {
  return (request.flags & kRequestStreamOrdered) != 0;
}

// Daemon: whether the caller's stream has done the work queued before a
// stream-ordered request, so that the request may start. True for any other.
inline bool requestReady(const Slot& slot, const Request& request) {
  return !streamOrdered(request) ||
         seqReached(slot.ready.load(std::memory_order_acquire), request.stream_seq);
}

// Daemon: slotPublish for any request. A stream-ordered request's caller is
// not waiting on the slot but its GPU stream is, on the released word: on
// success that is stored first (the daemon's kernels are done, the caller's
// stream goes on); on anything else the shim must run the request itself and
// release the stream, so its watcher is told through the header's attention
// word. Returns whether the slot's waiter needs slotWake().
inline bool requestPublish(SegmentView view, const Request& request, std::int32_t status) {
  Slot& slot = view.slot(request.slot);
  if (!streamOrdered(request)) return slotPublish(slot, request.generation, status);
  if (status == kStatusSuccess) {
    slot.released.store(request.stream_seq, std::memory_order_release);
    return slotPublish(slot, request.generation, status);
  }
  const bool wake = slotPublish(slot, request.generation, status);
  std::atomic<std::uint32_t>& attention = view.header()->attention;
  attention.fetch_add(1, std::memory_order_seq_cst);
  futexWake(&attention);
  return wake;
}

inline void requestComplete(SegmentView view, const Request& request, std::int32_t status) {
  if (requestPublish(view, request, status)) slotWake(view.slot(request.slot));
}

enum class WaitOutcome { kDone, kTimedOut, kGone };

inline constexpr std::uint64_t kPureSpinNs = 5'000;

// Client: waits for a slot to be done, spinning for `spin_ns` and then
// sleeping on the futex in slices of `slice_ns`, after each of which `alive()`
// is asked whether the daemon is still there. The word seen last is returned
// in `last_word`.
template <class Alive>
WaitOutcome slotWait(Slot& slot, std::uint32_t generation, std::uint64_t deadline_ns,
                     std::uint64_t spin_ns, std::uint64_t slice_ns, Alive&& alive,
                     std::uint32_t& last_word) {
  const std::uint32_t done = slotWord(generation, SlotState::kDone);
  const std::uint64_t start = nowNs();
  std::uint32_t spins = 0;
  while (true) {
    last_word = slot.word.load(std::memory_order_acquire);
    if (last_word == done) return WaitOutcome::kDone;
    if ((++spins & 63) == 0) {
      const std::uint64_t spun = nowNs() - start;
      if (spun >= spin_ns) break;
      // Past a short pure spin, give the core away between looks: with more
      // runnable threads than cores (many tenants, the daemon), a spinning
      // caller would hold the core the daemon needs to answer it.
      if (spun >= kPureSpinNs) sched_yield();
    }
    cpuRelax();
  }
  slot.sleepers.store(1, std::memory_order_seq_cst);
  WaitOutcome outcome = WaitOutcome::kDone;
  while (true) {
    last_word = slot.word.load(std::memory_order_seq_cst);
    if (last_word == done) break;
    const std::uint64_t now = nowNs();
    if (now >= deadline_ns) {
      outcome = WaitOutcome::kTimedOut;
      break;
    }
    if (!alive()) {
      last_word = slot.word.load(std::memory_order_seq_cst);
      outcome = last_word == done ? WaitOutcome::kDone : WaitOutcome::kGone;
      break;
    }
    const std::uint64_t left = deadline_ns - now;
    futexWait(&slot.word, last_word, left < slice_ns ? left : slice_ns);
  }
  slot.sleepers.store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
  return outcome;
}

}  // namespace stmux
