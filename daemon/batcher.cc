#include "daemon/batcher.h"

#include <algorithm>
#include <iterator>

namespace stmux::daemon {
namespace {

// Allowance on top of twice a tenant's think time before it counts as late.
constexpr std::uint64_t kLateSlackNs = 20'000;

// The first bucket whose bound holds `value`, or the last (above them all).
template <std::size_t N>
std::size_t bucketOf(const double (&bounds)[N], double value) {
  std::size_t i = 0;
  while (i < N && value > bounds[i])
    ++i;
  return i;
}

// What one operand of a request touches: bytes [first, end) of the
// client's allocation `alloc_id`.
struct Touched {
  std::uint64_t alloc_id = 0;  // 0: nothing
  std::uint64_t first = 0, end = 0;
};

struct Footprint {
  Touched reads[3];  // A, B, the bias
  Touched c;         // read with beta != 0, always written
};

Touched touched(const OperandDesc& operand, std::uint64_t extent) {
  if (operand.alloc_id == 0 || extent == 0) return {};
  const std::uint64_t end = operand.offset + extent;
  // Validated against the mapping only at launch: never wrap here.
  return {operand.alloc_id, operand.offset, end < operand.offset ? UINT64_MAX : end};
}

Footprint footprintOf(const Request& r) {
  // A request whose extents cannot be computed (the scheduler refuses those)
  // counts as touching the whole of each allocation it names.
  const GemmExtents whole{UINT64_MAX, UINT64_MAX, UINT64_MAX,
                          (r.epilogue & kEpilogueBias) != 0 ? UINT64_MAX : 0};
  const GemmExtents e = gemmExtents(GemmShape::of(r)).value_or(whole);
  const auto all = [](const OperandDesc& o, std::uint64_t extent) {
    return extent == UINT64_MAX && o.alloc_id != 0 ? Touched{o.alloc_id, 0, UINT64_MAX}
                                                   : touched(o, extent);
  };
  return {{all(r.a, e.a), all(r.b, e.b), all(r.bias, e.bias)}, all(r.c, e.c)};
}

// Whether `t` overlaps any of `ranges`. They are disjoint, so only the last
// that starts before t ends can reach into it.
template <class Ranges>
bool overlaps(const Ranges& ranges, const Touched& t) {
  if (t.alloc_id == 0) return false;
  auto it = ranges.lower_bound({t.alloc_id, t.end});
  if (it == ranges.begin()) return false;
  --it;
  return it->first.first == t.alloc_id && it->second > t.first;
}

// Adds `t` to `ranges`, merged with those it overlaps or adjoins.
template <class Ranges>
void addRange(Ranges& ranges, Touched t) {
  if (t.alloc_id == 0) return;
  auto it = ranges.lower_bound({t.alloc_id, t.first});
  if (it != ranges.begin()) {
    auto before = std::prev(it);
    if (before->first.first == t.alloc_id && before->second >= t.first) it = before;
  }
  while (it != ranges.end() && it->first.first == t.alloc_id && it->first.second <= t.end) {
    t.first = std::min(t.first, it->first.second);
    t.end = std::max(t.end, it->second);
    it = ranges.erase(it);
  }
  ranges.emplace(std::pair{t.alloc_id, t.first}, t.end);
}

// Whether a request of a tenant must not share a launch with those of its
// requests already taken, which write `writes` and read `reads`: it writes
// what one of them reads or writes, or reads what one writes. In one launch
// they would run at once, where the tenant's stream (two threads calling on
// it, say) runs them one after the other: an accumulation lost, a read of
// half-written data. O(log n) in the requests taken: the pairwise check
// before it was quadratic (one tenant's 256 requests: 0.59 ms of the server
// thread per batch, 4,096: 138 ms; now 0.14 and 2.2 ms; development machine).
template <class Ranges>
bool hazard(const Ranges& writes, const Ranges& reads, const Footprint& next) {
  if (overlaps(writes, next.c) || overlaps(reads, next.c)) return true;
  return std::any_of(std::begin(next.reads), std::end(next.reads),
                     [&](const Touched& read) { return overlaps(writes, read); });
}

template <class Ranges>
void addTaken(Ranges& writes, Ranges& reads, const Footprint& taken) {
  addRange(writes, taken.c);
  for (const Touched& read : taken.reads)
    addRange(reads, read);
}

}  // namespace

void Batcher::add(Queued item, std::uint64_t now_ns) {
  const std::uint32_t id = item.client->id;
  auto [it, inserted] = tenants_.try_emplace(id);
  Tenant& tenant = it->second;
  if (inserted) order_.push_back(id);
  // A think-time sample: the tenant had nothing outstanding since its last
  // completion, so this gap is its own time between calls.
  if (tenant.queue.empty() && tenant.in_flight == 0 && tenant.has_completed &&
      now_ns >= tenant.last_completion_ns &&
      now_ns - tenant.last_completion_ns < options_.active_ns) {
    const std::uint64_t sample = now_ns - tenant.last_completion_ns;
    tenant.think_ns = tenant.think_ns == 0 ? sample : (3 * tenant.think_ns + sample) / 4;
  }
  tenant.last_submit_ns = now_ns;
  item.arrival_ns = now_ns;
  tenant.queue.push_back(std::move(item));
  ++queued_;
  ++stats_.requests;
}

std::optional<Batch> Batcher::take(std::uint64_t now_ns, std::uint64_t& wake_at_ns) {
  wake_at_ns = 0;
  if (queued_ == 0 || in_flight_ >= options_.max_in_flight) return std::nullopt;

  std::uint64_t oldest = UINT64_MAX;
  for (const auto& [id, tenant] : tenants_) {
    if (!tenant.queue.empty()) oldest = std::min(oldest, tenant.queue.front().arrival_ns);
  }
  const std::uint64_t deadline = oldest + options_.window_ns;

  LaunchReason reason;
  if (queued_ >= options_.max_batch) {
    reason = LaunchReason::kFull;
  } else if (now_ns >= deadline) {
    reason = LaunchReason::kWindow;
  } else {
    bool all_waiting = true;
    bool expected = false;
    std::uint64_t expected_until = 0;
    for (const auto& [id, tenant] : tenants_) {
      if (!tenant.queue.empty()) continue;
      // Every tenant in the map has submitted at least once.
      if (now_ns - tenant.last_submit_ns >= options_.active_ns) continue;
      all_waiting = false;
      if (tenant.in_flight > 0) {
        expected = true;  // back after its completion; bounded by the window
        expected_until = deadline;
      } else if (tenant.think_ns != 0) {
        const std::uint64_t predicted = tenant.last_completion_ns + tenant.think_ns;
        const std::uint64_t late = tenant.last_completion_ns + 2 * tenant.think_ns + kLateSlackNs;
        if (predicted <= deadline && now_ns < late) {
          expected = true;
          expected_until = std::max(expected_until, std::min(late, deadline));
        }
      }
    }
    if (all_waiting) {
      reason = LaunchReason::kAllWaiting;
    } else if (in_flight_ == 0 && !expected) {
      reason = LaunchReason::kIdle;
    } else {
      wake_at_ns = expected ? std::min(deadline, expected_until) : deadline;
      return std::nullopt;
    }
  }

  Batch batch;
  batch.id = next_id_++;
  batch.reason = reason;
  batch.launched_ns = now_ns;
  const std::size_t limit = std::min<std::size_t>(queued_, options_.max_batch);
  batch.items.reserve(limit);
  const std::size_t tenant_count = order_.size();
  const std::size_t first = next_first_ % tenant_count;
  // Round-robin, one request from each tenant in turn. A tenant whose next
  // request races one of its own already taken (hazard) is done for this
  // batch, so that its requests keep their order: the rest go in the next.
  // (Footprints are worked out only for a tenant's second request and on:
  // most batches take one from each.)
  std::size_t last = first;  // the tenant (in order_) last taken from
  for (bool progressed = true; progressed && batch.items.size() < limit;) {
    progressed = false;
    for (std::size_t i = 0; i < tenant_count && batch.items.size() < limit; ++i) {
      Tenant& tenant = tenants_[order_[(first + i) % tenant_count]];
      if (tenant.batch != batch.id) {
        tenant.batch = batch.id;
        tenant.taken = 0;
        tenant.writes.clear();
        tenant.reads.clear();
        tenant.held = false;
      }
      if (tenant.held || tenant.queue.empty()) continue;
      if (tenant.taken == 0) {
        tenant.first_item = batch.items.size();
      } else {
        if (tenant.taken == 1) {
          addTaken(tenant.writes, tenant.reads,
                   footprintOf(batch.items[tenant.first_item].request));
        }
        const Footprint next = footprintOf(tenant.queue.front().request);
        if (hazard(tenant.writes, tenant.reads, next)) {
          tenant.held = true;
          ++stats_.held_for_hazard;
          continue;
        }
        addTaken(tenant.writes, tenant.reads, next);
      }
      ++tenant.taken;
      const std::uint64_t waited = now_ns - tenant.queue.front().arrival_ns;
      stats_.wait_ns += waited;
      ++stats_.waits[bucketOf(kWaitBoundsS, static_cast<double>(waited) / 1e9)];
      last = (first + i) % tenant_count;
      batch.items.push_back(std::move(tenant.queue.front()));
      tenant.queue.pop_front();
      ++tenant.in_flight;
      progressed = true;
    }
  }
  // A batch cut short by its size: the next starts with the tenant after the
  // last taken, so that those past the cut are first next time.
  next_first_ = batch.items.size() == options_.max_batch ? last + 1 : first + 1;
  queued_ -= batch.items.size();
  ++in_flight_;
  ++stats_.batches;
  ++stats_.batch_sizes[bucketOf(kBatchSizeBounds, static_cast<double>(batch.items.size()))];
  stats_.launched += batch.items.size();
  ++stats_.launches[static_cast<std::size_t>(reason)];
  return batch;
}

void Batcher::completed(const Batch& batch, std::uint64_t now_ns) {
  if (in_flight_ > 0) --in_flight_;
  for (const Queued& item : batch.items) {
    auto it = tenants_.find(item.client->id);
    if (it == tenants_.end()) continue;  // removed while its batch ran
    Tenant& tenant = it->second;
    if (tenant.in_flight > 0) --tenant.in_flight;
    tenant.last_completion_ns = now_ns;
    tenant.has_completed = true;
  }
}

std::vector<Queued> Batcher::removeTenant(std::uint32_t tenant_id) {
  std::vector<Queued> dropped;
  auto it = tenants_.find(tenant_id);
  if (it == tenants_.end()) return dropped;
  dropped.assign(std::make_move_iterator(it->second.queue.begin()),
                 std::make_move_iterator(it->second.queue.end()));
  queued_ -= dropped.size();
  tenants_.erase(it);
  order_.erase(std::find(order_.begin(), order_.end(), tenant_id));
  return dropped;
}

}  // namespace stmux::daemon
