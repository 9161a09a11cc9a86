// Which way the GEMMs of the tenants on MPS go under STMUX_ROUTE=auto: all
// served by the daemon, or all straight to cuBLAS. Chosen by measuring the
// tenants themselves, both ways, now and then.
//
// On MPS a hand-off between a tenant's context and the daemon's costs no
// context switch, and whether serving pays depends on the tenants: pure GEMM
// tenants gain from batching (cube 256³ at R = 32: 1.55x MPS alone), tenants
// with kernels of their own between dependent GEMMs lose a whole round trip
// per GEMM to it (a PyTorch MLP at R = 32: 0.28x, docs/BENCHMARKS.md). No rule
// read off the calls tells the two apart, so the daemon measures.
//
// The choice is the fleet's, not each tenant's: one tenant going direct among
// served ones runs its GEMMs beside their batches, alone on MPS, and wins its
// own comparison even where the tenants as a whole lose when all do the same
// (the batches shrink for everyone). So every look flips all of them: a window
// of calls on the route taken, one on the other, one on the route taken again,
// with a short unmeasured pause after each flip for calls already under way.
// Each tenant's calls per second (its closed loop's speed) on the other route
// is compared with the mean of its two windows around it, which cancels a
// steady drift; the look's gain is the median over the tenants that made calls
// in all three windows, so that each tenant counts once whatever its speed and
// no one tenant's word decides. A route is left only when the other won in
// `confirmations` looks in a row: direct must beat served by `margin`, served
// need only be as fast as direct (`back_margin`), since served is what batches
// and, at many tenants, what keeps the tail (cube 256³ at R = 32 on the H200:
// worst p99 197 us served against MPS alone's 4,060 us, as many calls); each
// look that confirms the route doubles the time to the next. A change in how
// many tenants take part voids a look under way and starts over from the first
// interval (the answer may have changed with them), with the next look no later
// than one already due; the first look after it only warms up (one-off costs on
// the route not taken: a cuBLAS tenant on the H200 made 0.03x as many calls in
// its first direct window as served) and is followed at once by one that
// counts.
//
// Pure logic on a clock the caller passes in; the server holds one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace stmux::daemon {

struct FleetRouteOptions {
  // A window closes once it lasted `window_min_ns` and the tenants made
  // `calls_per_tenant` calls each on average in it, or at `window_max_ns`.
  std::uint64_t window_min_ns = 20'000'000;
  std::uint64_t window_max_ns = 500'000'000;
  std::uint64_t calls_per_tenant = 32;
  // Not measured after each flip: calls made before it still finishing.
  std::uint64_t settle_ns = 2'000'000;
  // A tenant counts in a look only with this many calls in each window.
  std::uint64_t min_calls = 8;
  // The first look: this long after tenants (or a different number of them)
  // started making calls, past their one-off costs (CUDA loads lazily).
  std::uint64_t first_look_ns = 1'000'000'000;
  // Later looks: from `first_interval_ns`, doubling to `max_interval_ns`.
  std::uint64_t first_interval_ns = 1'000'000'000;
  std::uint64_t max_interval_ns = 64'000'000'000;
  double margin = 1.15;      // direct over served, to go direct
  double back_margin = 1.0;  // served over direct, to go back to served
  std::uint32_t confirmations = 2;
  // How often the route wants a look at the counts during a look.
  std::uint64_t tick_ns = 1'000'000;
};

// One tenant's calls so far (served or not), by a key that stays with it.
struct TenantCalls {
  std::uint32_t id = 0;
  std::uint64_t calls = 0;
};

// What a finished look found.
struct FleetLook {
  bool direct_before = false;  // the route taken during the look
  bool direct_after = false;   // the route taken from now on
  double gain = 0;             // the other route's calls/s over the taken one's
  std::size_t tenants = 0;     // counted in it; 0: void (too few calls)
  bool warm_up = false;        // the first since the fleet changed: decided nothing
};

class FleetRoute {
 public:
  explicit FleetRoute(FleetRouteOptions options = {});

  // Called with the calls so far of every tenant that takes part (active,
  // on MPS); returns the route word to publish (kFleetDirect, kFleetLook).
  // `look` is set when this step finished a look.
  std::uint32_t step(std::uint64_t now_ns, const std::vector<TenantCalls>& tenants,
                     FleetLook* look = nullptr);

  // When the next step is wanted (0: only when tenants take part).
  std::uint64_t nextStepNs() const;

  bool direct() const { return direct_; }
  bool looking() const { return phase_ != Phase::kSettled; }
  std::uint64_t looks() const { return looks_; }
  const FleetLook& lastLook() const { return last_; }

 private:
  enum class Phase { kSettled, kBefore, kFlipOut, kOther, kFlipBack, kAfter };
  // Calls per second of each tenant in one window, by id (in id order).
  using Rates = std::vector<std::pair<std::uint32_t, double>>;

  void startWindow(Phase phase, std::uint64_t now_ns, const std::vector<TenantCalls>& tenants);
  bool windowFull(std::uint64_t now_ns, const std::vector<TenantCalls>& tenants) const;
  Rates windowRates(std::uint64_t now_ns, const std::vector<TenantCalls>& tenants) const;
  FleetLook finishLook(const Rates& after) const;
  void settle(std::uint64_t next_look_ns);
  std::uint32_t word() const;

  FleetRouteOptions o_;
  bool direct_ = false;
  Phase phase_ = Phase::kSettled;
  std::size_t taking_part_ = 0;     // tenants at the last step
  std::uint64_t next_look_ns_ = 0;  // 0: no tenants yet
  std::uint64_t interval_ns_;
  std::uint32_t wins_ = 0;   // looks in a row the other route won
  bool warming_up_ = false;  // the next look is the first since the fleet changed
  std::uint64_t looks_ = 0;
  FleetLook last_;
  std::uint64_t phase_start_ns_ = 0;
  std::uint64_t last_step_ns_ = 0;
  std::vector<TenantCalls> window_start_;  // the counts when the window opened, by id
  Rates before_, other_;
};

}  // namespace stmux::daemon
