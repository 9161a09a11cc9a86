#include "daemon/fleet_route.h"

#include <algorithm>
#include <cmath>

#include "stmux/wire.h"

namespace stmux::daemon {
namespace {

// A tenant's gain in a look counts for at most 8x either way (the largest
// measured was 6.7x: one PyTorch rnn tenant off MPS, served against direct).
const double kMostLogGain = std::log(8.0);

std::uint64_t callsOf(const std::vector<TenantCalls>& sorted, std::uint32_t id, bool* found) {
  const auto it =
      std::lower_bound(sorted.begin(), sorted.end(), id,
                       [](const TenantCalls& t, std::uint32_t key) { return t.id < key; });
  *found = it != sorted.end() && it->id == id;
  return *found ? it->calls : 0;
}

double rateOf(const std::vector<std::pair<std::uint32_t, double>>& rates, std::uint32_t id) {
  const auto it = std::lower_bound(
      rates.begin(), rates.end(), id,
      [](const std::pair<std::uint32_t, double>& r, std::uint32_t key) { return r.first < key; });
  return it != rates.end() && it->first == id ? it->second : -1;
}

}  // namespace

FleetRoute::FleetRoute(FleetRouteOptions options)
    : o_(options), interval_ns_(options.first_interval_ns) {}

std::uint32_t FleetRoute::word() const {
  const bool other_way = phase_ == Phase::kFlipOut || phase_ == Phase::kOther;
  std::uint32_t w = (direct_ != other_way) ? kFleetDirect : 0;
  if (phase_ != Phase::kSettled) w |= kFleetLook;
  return w;
}

std::uint64_t FleetRoute::nextStepNs() const {
  if (taking_part_ == 0) return 0;
  if (phase_ == Phase::kSettled) return next_look_ns_;
  return last_step_ns_ + o_.tick_ns;  // a window's end is found by looking
}

void FleetRoute::settle(std::uint64_t next_look_ns) {
  phase_ = Phase::kSettled;
  next_look_ns_ = next_look_ns;
  before_.clear();
  other_.clear();
}

void FleetRoute::startWindow(Phase phase, std::uint64_t now_ns,
                             const std::vector<TenantCalls>& tenants) {
  phase_ = phase;
  phase_start_ns_ = now_ns;
  window_start_ = tenants;
  std::sort(window_start_.begin(), window_start_.end(),
            [](const TenantCalls& x, const TenantCalls& y) { return x.id < y.id; });
}

bool FleetRoute::windowFull(std::uint64_t now_ns, const std::vector<TenantCalls>& tenants) const {
  const std::uint64_t elapsed = now_ns - phase_start_ns_;
  if (elapsed >= o_.window_max_ns) return true;
  if (elapsed < o_.window_min_ns) return false;
  std::uint64_t calls = 0;
  for (const TenantCalls& t : tenants) {
    bool found = false;
    const std::uint64_t start = callsOf(window_start_, t.id, &found);
    if (found && t.calls > start) calls += t.calls - start;
  }
  return calls >= o_.calls_per_tenant * tenants.size();
}

FleetRoute::Rates FleetRoute::windowRates(std::uint64_t now_ns,
                                          const std::vector<TenantCalls>& tenants) const {
  const double seconds = static_cast<double>(now_ns - phase_start_ns_) / 1e9;
  Rates rates;
  for (const TenantCalls& t : tenants) {
    bool found = false;
    const std::uint64_t start = callsOf(window_start_, t.id, &found);
    // Counts are the tenant's own word (its segment): never wrap on them.
    if (!found || t.calls < start || t.calls - start < o_.min_calls) continue;
    rates.emplace_back(t.id, static_cast<double>(t.calls - start) / seconds);
  }
  std::sort(rates.begin(), rates.end());
  return rates;
}

// What the look found once its third window closed (`after`): each tenant's
// rate on the other route over the mean of its two windows on the taken one.
FleetLook FleetRoute::finishLook(const Rates& after) const {
  FleetLook look;
  look.direct_before = direct_;
  std::vector<double> log_gains;
  log_gains.reserve(before_.size());
  for (const auto& [id, before] : before_) {
    const double later = rateOf(after, id);
    const double other = rateOf(other_, id);
    if (later <= 0 || other <= 0) continue;
    // Bounded: a route changes a tenant's rate by less than this.
    log_gains.push_back(
        std::clamp(std::log(other / ((before + later) / 2)), -kMostLogGain, kMostLogGain));
  }
  look.tenants = log_gains.size();
  if (log_gains.empty()) return look;
  // The median tenant's gain, so that no one tenant (whose counts are its own
  // word) decides for the fleet: with the mean of the bounded gains one liar
  // among fewer than about 15 tenants did (1 of 4 kept the fleet direct while
  // the other 3 were 1.3x faster served).
  const std::size_t half = log_gains.size() / 2;
  std::nth_element(log_gains.begin(), log_gains.begin() + half, log_gains.end());
  double median = log_gains[half];
  if (log_gains.size() % 2 == 0) {
    median = (median + *std::max_element(log_gains.begin(), log_gains.begin() + half)) / 2;
  }
  look.gain = std::exp(median);
  return look;
}

std::uint32_t FleetRoute::step(std::uint64_t now_ns, const std::vector<TenantCalls>& tenants,
                               FleetLook* look) {
  if (look != nullptr) *look = {};
  last_step_ns_ = now_ns;
  if (tenants.empty()) {
    // Nobody left: the next fleet starts afresh, served.
    taking_part_ = 0;
    direct_ = false;
    wins_ = 0;
    interval_ns_ = o_.first_interval_ns;
    settle(0);
    return word();
  }
  if (tenants.size() != taking_part_) {
    // Others now: a look under way measured the wrong fleet, and the answer
    // may have changed. Keep the route; look again soon, but no later than
    // a look already due (tenants that start one by one would otherwise put
    // the look off for as long as they keep coming).
    const bool first = taking_part_ == 0;
    taking_part_ = tenants.size();
    wins_ = 0;
    warming_up_ = true;
    interval_ns_ = o_.first_interval_ns;
    const std::uint64_t soon = now_ns + o_.first_look_ns;
    settle(first ? soon : std::min(next_look_ns_, soon));
    return word();
  }
  switch (phase_) {
    case Phase::kSettled:
      if (now_ns >= next_look_ns_) startWindow(Phase::kBefore, now_ns, tenants);
      break;
    case Phase::kBefore:
    case Phase::kOther:
      if (windowFull(now_ns, tenants)) {
        (phase_ == Phase::kBefore ? before_ : other_) = windowRates(now_ns, tenants);
        phase_ = phase_ == Phase::kBefore ? Phase::kFlipOut : Phase::kFlipBack;
        phase_start_ns_ = now_ns;
      }
      break;
    case Phase::kFlipOut:
    case Phase::kFlipBack:
      if (now_ns - phase_start_ns_ >= o_.settle_ns) {
        startWindow(phase_ == Phase::kFlipOut ? Phase::kOther : Phase::kAfter, now_ns, tenants);
      }
      break;
    case Phase::kAfter: {
      if (!windowFull(now_ns, tenants)) break;
      FleetLook made = finishLook(windowRates(now_ns, tenants));
      ++looks_;
      // Records the look, then either looks again at once or settles.
      auto report = [&](bool again) {
        made.direct_after = direct_;
        last_ = made;
        if (look != nullptr) *look = made;
        if (again) {
          startWindow(Phase::kBefore, now_ns, tenants);
        } else {
          settle(now_ns + interval_ns_);
        }
      };
      if (warming_up_ && made.tenants != 0) {
        // The first look since the fleet changed paid one-off costs on the
        // route not taken (a process's first direct calls load cuBLAS's
        // kernels lazily; its first served ones open its memory in the
        // daemon): it decides nothing, and the next follows at once.
        warming_up_ = false;
        made.warm_up = true;
        report(/*again=*/true);
        break;
      }
      const bool won = made.tenants != 0 && made.gain > (direct_ ? o_.back_margin : o_.margin);
      if (won && ++wins_ < o_.confirmations) {
        report(/*again=*/true);  // won once: look again at once
        break;
      }
      if (won) {
        direct_ = !direct_;
        interval_ns_ = o_.first_interval_ns;
      } else {
        // Confirmed, or too few calls to tell: later, as if confirmed.
        interval_ns_ = std::min(interval_ns_ * 2, o_.max_interval_ns);
      }
      wins_ = 0;
      report(/*again=*/false);
      break;
    }
  }
  return word();
}

}  // namespace stmux::daemon
