// Which way a process's GEMMs go under STMUX_ROUTE=auto: served by the
// daemon, or straight to cuBLAS, chosen by measuring both.
//
// Serving pays off when the GPU is shared: without MPS, tenants that call
// cuBLAS directly time-slice the GPU, and one batched launch replaces dozens of
// context switches. It loses when the process launches kernels of its own
// between GEMMs and the two contexts (the tenant's, the daemon's) are not
// both on MPS: each hand-off is then a GPU context switch, and one such tenant
// alone runs several times slower served than direct.
//
// So a process is served whenever other tenants of the daemon are making
// calls (the daemon says how many): serving them together is the point, and
// each direct call would switch the GPU's context under their batches (a look
// at the direct route by each of 32 tenants cut their GEMMs/s by half, measured
// on the H200). Alone, which route is faster cannot be told from the calls, so
// it is measured: now and then a short
// window of the process's calls goes the other way, and the rate at which the
// process makes calls (its closed loop's speed: the mean time between calls,
// the longest tenth left out so that a rare hiccup of the program's own does
// not decide) in that window is compared with the window just before it. A route is left only when
// the other one was clearly faster in two looks in a row (one look is noise-prone: a pause of a few
// milliseconds in one window, and a wrong switch costs a whole interval); each confirmation doubles
// the time to the next look, so a settled process spends a window of calls in some tens of seconds
// on the route it does not take. The first look at a route is never cut short: its first calls pay
// one-off costs (CUDA loads lazily, milliseconds each, the kernels a process has not yet run
// itself) that a full window's trimmed mean leaves out but an early cut-off would take for a loss.
//
// Pure logic on a clock the caller passes in; the shim holds one per process
// under its own lock.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <numeric>

namespace stmux::shim {

enum class Route : std::uint32_t { kServe = 0, kDirect = 1 };

inline Route other(Route route) {
  return route == Route::kServe ? Route::kDirect : Route::kServe;
}
inline const char* routeName(Route route) {
  return route == Route::kServe ? "served" : "direct";
}

struct RouteOptions {
  // A window closes after this many calls and at least `window_min_ns`...
  std::uint32_t window_calls = 32;
  std::uint64_t window_min_ns = 5'000'000;
  // ...and a look the other way ends early once it has taken this many times
  // as long as the window before it: it already lost. (Without MPS, calls
  // made directly next to busy tenants wait for time slices of milliseconds.)
  double probe_cutoff = 2.0;
  // A window with a gap this long between two calls measured the program's
  // pauses, not a route: it is dropped.
  std::uint64_t max_gap_ns = 100'000'000;
  // The first look: after this many calls and this long on the first route.
  std::uint32_t first_calls = 64;
  std::uint64_t first_ns = 300'000'000;
  // Later looks: from `first_interval_ns`, doubling to `max_interval_ns`.
  std::uint64_t first_interval_ns = 1'000'000'000;
  std::uint64_t max_interval_ns = 64'000'000'000;
  // The other route must make calls this much faster, in this many looks in
  // a row, to be taken.
  double margin = 1.15;
  std::uint32_t confirmations = 2;
};

// What one measured pair of windows decided; returned by onCall when it did.
struct RouteDecision {
  bool decided = false;
  Route from = Route::kServe;
  Route to = Route::kServe;
  double from_rate = 0;  // calls per second on each; 0 when company decided
  double to_rate = 0;
  bool company = false;  // other tenants came: back to serving, unmeasured
};

class RouteChooser {
 public:
  explicit RouteChooser(RouteOptions options = {})
      : o_(options), interval_ns_(options.first_interval_ns) {}

  // The route of a call made at `now_ns`, with `company` when other tenants
  // are making calls; counts it. `decision` says whether this call ended a
  // look the other way, and what it found, or left the direct route for
  // company.
  Route onCall(std::uint64_t now_ns, bool company, RouteDecision* decision = nullptr) {
    if (decision != nullptr) *decision = {};
    ++calls_;
    if (first_call_ns_ == 0) first_call_ns_ = now_ns;
    if (company) {
      if (route_ == Route::kDirect && decision != nullptr) {
        *decision = {true, Route::kDirect, Route::kServe, 0, 0, true};
      }
      route_ = Route::kServe;
      phase_ = Phase::kSettled;  // a look under way measured the others too
      wins_ = 0;
      interval_ns_ = o_.first_interval_ns;
      next_look_ns_ = now_ns + o_.first_ns;  // alone again: look soon
      return route_;
    }
    if (phase_ == Phase::kSettled) {
      const bool first = next_look_ns_ == 0;
      const bool due = first ? calls_ >= o_.first_calls && now_ns - first_call_ns_ >= o_.first_ns
                             : now_ns >= next_look_ns_;
      if (due) startWindow(Phase::kBaseline, now_ns);
      return route_;
    }
    if (now_ns - last_ns_ > o_.max_gap_ns) {  // a pause: measure again later
      if (phase_ == Phase::kProbe) looked_[index(other(route_))] = true;
      phase_ = Phase::kSettled;
      wins_ = 0;
      next_look_ns_ = now_ns + interval_ns_;
      return route_;
    }
    gaps_[window_count_++] = static_cast<std::uint32_t>(now_ns - last_ns_);
    last_ns_ = now_ns;
    const std::uint64_t elapsed = now_ns - window_start_ns_;
    const bool full = window_count_ == gaps_.size() ||
                      (window_count_ >= o_.window_calls && elapsed >= o_.window_min_ns);
    if (phase_ == Phase::kBaseline) {
      if (full) {
        baseline_rate_ = windowRate();
        baseline_ns_ = elapsed;
        startWindow(Phase::kProbe, now_ns);
        return other(route_);
      }
      return route_;
    }
    // A look the other way.
    const bool lost = looked_[index(other(route_))] &&
                      static_cast<double>(elapsed) >= o_.probe_cutoff * baseline_ns_;
    if (!full && !lost) return other(route_);
    looked_[index(other(route_))] = true;
    const double probe_rate = windowRate();
    if (probe_rate > o_.margin * baseline_rate_ && ++wins_ < o_.confirmations) {
      startWindow(Phase::kBaseline, now_ns);  // won: look again at once
      return route_;
    }
    RouteDecision made{true, route_, route_, baseline_rate_, probe_rate};
    if (wins_ >= o_.confirmations) {
      route_ = other(route_);
      made.to = route_;
      interval_ns_ = o_.first_interval_ns;
    } else {
      interval_ns_ = std::min(interval_ns_ * 2, o_.max_interval_ns);
    }
    wins_ = 0;
    if (decision != nullptr) *decision = made;
    phase_ = Phase::kSettled;
    next_look_ns_ = now_ns + interval_ns_;
    return route_;
  }

  Route route() const { return route_; }

 private:
  enum class Phase { kSettled, kBaseline, kProbe };

  static std::size_t index(Route route) { return static_cast<std::size_t>(route); }
  // Calls per second in the window now closing: one over the mean gap between
  // its calls, the longest tenth of the gaps left out. (Reorders gaps_.)
  double windowRate() {
    const std::uint32_t kept = window_count_ - window_count_ / 10;
    std::nth_element(gaps_.begin(), gaps_.begin() + kept - 1, gaps_.begin() + window_count_);
    const double total = std::accumulate(gaps_.begin(), gaps_.begin() + kept, 0.0);
    return 1e9 * kept / std::max(total, 1.0);
  }
  void startWindow(Phase phase, std::uint64_t now_ns) {
    phase_ = phase;
    window_start_ns_ = now_ns;
    last_ns_ = now_ns;
    window_count_ = 0;
  }

  RouteOptions o_;
  Route route_ = Route::kServe;
  Phase phase_ = Phase::kSettled;
  std::uint64_t calls_ = 0;
  std::uint64_t first_call_ns_ = 0;
  std::uint64_t next_look_ns_ = 0;  // 0: the first look has not come
  std::uint64_t interval_ns_;
  std::uint64_t window_start_ns_ = 0;
  std::uint64_t last_ns_ = 0;
  std::uint32_t window_count_ = 0;              // gaps in the window so far
  std::array<std::uint32_t, 1024> gaps_ = {};   // between its calls, ns
  std::uint32_t wins_ = 0;                      // looks in a row in which the other route won
  std::array<bool, 2> looked_ = {true, false};  // by Route: taken, or looked at, before
  double baseline_rate_ = 0;
  double baseline_ns_ = 0;
};

}  // namespace stmux::shim
