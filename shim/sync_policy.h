// How a tenant's threads wait for its GPU (STMUX_SYNC): the scheduling flag
// of its CUDA context, which decides how the program's own synchronizations
// (cudaStreamSynchronize, torch.cuda.synchronize) wait, and whether the
// shim's own wait for a served call spins before it sleeps.
//
// By default CUDA spins in a synchronization while the process has no more
// contexts than the machine has cores: one context each, so every tenant
// spins, however many tenants share the cores. With more busy tenants than
// cores the spinning threads take each other's slices (and the daemon's), and
// the tail is set by the CPU: issue 17 measured 32 MPS tenants on 16 cores
// at a worst p99 of 4.1 ms spinning and 1.1 ms with blocking sync.
//
// Pure logic; the shim applies it with cuCtxSetFlags, which changes a context
// that exists (the shim meets the context only at the program's first GEMM).
// A program that chose a scheduling flag itself keeps it.
#pragma once

#include <optional>
#include <string_view>

namespace stmux::shim {

enum class SyncMode { kKeep, kAuto, kSpin, kYield, kBlocking };

inline std::optional<SyncMode> parseSyncMode(std::string_view text) {
  if (text == "keep") return SyncMode::kKeep;
  if (text == "auto") return SyncMode::kAuto;
  if (text == "spin") return SyncMode::kSpin;
  if (text == "yield") return SyncMode::kYield;
  if (text == "blocking") return SyncMode::kBlocking;
  return std::nullopt;
}

// CU_CTX_SCHED_* values (checked against cuda.h where the shim includes it).
inline constexpr unsigned kSchedAuto = 0x0, kSchedSpin = 0x1, kSchedYield = 0x2,
                          kSchedBlocking = 0x4, kSchedMask = 0x7;

struct SyncChoice {
  unsigned sched = kSchedAuto;  // the context's scheduling flag to have
  bool spin = true;             // whether the shim's own waits spin first
};

// What the context should have: `tenants` are those making calls (this one
// among them), `cores` the CPUs this process may run on, `served` whether
// this call goes to the daemon, `may_spin` whether the daemon gives this
// tenant a turn to spin (STMUX_SPINNING_TENANTS: it keeps the spinners fewer
// than the cores, so that none loses its core to another).
inline SyncChoice chooseSync(SyncMode mode, unsigned tenants, unsigned cores, bool served = true,
                             bool may_spin = false) {
  switch (mode) {
    case SyncMode::kKeep:
      return {kSchedAuto, true};
    case SyncMode::kSpin:
      return {kSchedSpin, true};
    case SyncMode::kYield:
      return {kSchedYield, true};
    case SyncMode::kBlocking:
      return {kSchedBlocking, false};
    case SyncMode::kAuto:
      break;
  }
  if (tenants <= cores || may_spin) return {kSchedAuto, true};
  // Served: blocking in both waits. With the shim's own wait still polling
  // (it yields the core after 5 us) PyTorch tenants on MPS at R=32 kept a
  // worst p99 of 4.0 ms (torch-cube); blocking in both met 1 ms on every
  // R=32 row, at a cost in throughput; yielding in both left the daemon too
  // little of the cores (cube: worst p99 4.3 ms) (docs/BENCHMARKS.md).
  if (served) return {kSchedBlocking, false};
  // Direct (STMUX_ROUTE=auto found it faster, on MPS): yielding. MPS alone at
  // R=32 on 16 cores made 2% to 10% fewer PyTorch rnn steps with its tenants
  // yielding than spinning, at a worst p99 of 0.39 to 3.4 ms against 4.1 to
  // 4.2; blocking cost 33% of the steps (docs/BENCHMARKS.md, thirty-third
  // session).
  return {kSchedYield, true};
}

// The flags to set on a context whose flags are `current`, given what the
// shim set on it before (`ours`, nullopt if nothing), or nullopt to leave it:
// when it already has the flag, or when its scheduling flag is the program's
// own choice (not CUDA's default and not the shim's).
inline std::optional<unsigned> contextFlags(unsigned current, std::optional<unsigned> ours,
                                            unsigned wanted_sched) {
  const unsigned sched = current & kSchedMask;
  if (sched != kSchedAuto && sched != ours) return std::nullopt;  // the program's
  if (sched == wanted_sched) return std::nullopt;
  return (current & ~kSchedMask) | wanted_sched;
}

}  // namespace stmux::shim
