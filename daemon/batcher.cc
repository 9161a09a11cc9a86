#include "daemon/batcher.h"

#include <algorithm>

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

bool overlap(const Touched& x, const Touched& y) {
  return x.alloc_id != 0 && x.alloc_id == y.alloc_id && x.first < y.end && y.first < x.end;
}

// Whether two requests of one tenant must not share a launch: one writes
// what the other reads or writes. In one launch they would run at once,
// where the tenant's stream (two threads calling on it, say) runs them one
// after the other: an accumulation lost, a read of half-written data.
bool hazard(const Footprint& earlier, const Footprint& next) {
  if (overlap(earlier.c, next.c)) return true;
  for (const Touched& read : next.reads) {
    if (overlap(earlier.c, read)) return true;
  }
  for (const Touched& read : earlier.reads) {
    if (overlap(read, next.c)) return true;
  }
  return false;
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
  for (bool progressed = true; progressed && batch.items.size() < limit;) {
    progressed = false;
    for (std::size_t i = 0; i < tenant_count && batch.items.size() < limit; ++i) {
      Tenant& tenant = tenants_[order_[(first + i) % tenant_count]];
      if (tenant.batch != batch.id) {
        tenant.batch = batch.id;
        tenant.taken.clear();
        tenant.held = false;
      }
      if (tenant.held || tenant.queue.empty()) continue;
      if (!tenant.taken.empty()) {
        const Footprint next = footprintOf(tenant.queue.front().request);
        if (std::any_of(tenant.taken.begin(), tenant.taken.end(), [&](std::size_t item) {
              return hazard(footprintOf(batch.items[item].request), next);
            })) {
          tenant.held = true;
          ++stats_.held_for_hazard;
          continue;
        }
      }
      tenant.taken.push_back(batch.items.size());
      const std::uint64_t waited = now_ns - tenant.queue.front().arrival_ns;
      stats_.wait_ns += waited;
      ++stats_.waits[bucketOf(kWaitBoundsS, static_cast<double>(waited) / 1e9)];
      batch.items.push_back(std::move(tenant.queue.front()));
      tenant.queue.pop_front();
      ++tenant.in_flight;
      progressed = true;
    }
  }
  next_first_ = first + 1;
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
