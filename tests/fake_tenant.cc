// A stand-in for stmux-bench's tenants with no GPU: it takes the arguments
// the bench gives stmux-cublas-client, speaks the start barrier
// (tools/barrier.h), and each "step" sleeps 200 us; `devices` names one fake
// GPU, as stmux-cublas-client names the real ones. FAKE_TENANT_PLAN makes
// some tenants misbehave, "INDEX=BEHAVIOUR[,INDEX=BEHAVIOUR...]":
//   slow-ready         ready INDEX * 300 ms later than the others
//   never-ready        sets up forever (until killed)
//   exit-before-ready  exits 3 before it is ready, saying why
//   exit-in-span       exits 1 once the timed span has begun
//   stall              its first step after the clock starts lasts past the span
//   early-stop         claims a result that ends before the span does
//   slow-later         its steps sleep 600 us from the span's middle on
//   fast-later         its steps sleep 600 us until the span's middle
//   busy               its steps keep the core busy for 200 us, then sleep
//                      200 us
// Every tenant prints "ready_ns N" on stdout when it is ready.
#include <getopt.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>

#include "tools/barrier.h"

namespace {

using stmux::tools::realtimeNs;

std::string behaviourOf(int tenant) {
  const char* plan = std::getenv("FAKE_TENANT_PLAN");
  if (plan == nullptr) return "ok";
  std::stringstream items(plan);
  for (std::string item; std::getline(items, item, ',');) {
    const std::size_t equals = item.find('=');
    if (equals != std::string::npos && std::atoi(item.substr(0, equals).c_str()) == tenant) {
      return item.substr(equals + 1);
    }
  }
  return "ok";
}

void sleepUs(long us) {
  std::this_thread::sleep_for(std::chrono::microseconds(us));
}

}  // namespace

int main(int argc, char** argv) {
  // The bench's probe for a GPU: this one has a fake one.
  if (argc == 2 && std::strcmp(argv[1], "devices") == 0) {
    std::printf("GPU 0: fake, 0 MiB\n");
    return 0;
  }
  stmux::tools::TenantFiles files;
  int tenant = 0;
  static const option kLong[] = {
      {"ready", required_argument, nullptr, 'r'}, {"go", required_argument, nullptr, 'g'},
      {"out", required_argument, nullptr, 'o'},   {"tenant", required_argument, nullptr, 't'},
      {"m", required_argument, nullptr, 'x'},     {"n", required_argument, nullptr, 'x'},
      {"k", required_argument, nullptr, 'x'},     {"count", required_argument, nullptr, 'x'},
      {"mixed", no_argument, nullptr, 'x'},       {nullptr, 0, nullptr, 0}};
  optind = 2;  // argv[1] is the mode (loop or ceiling)
  for (int c; (c = getopt_long(argc, argv, "", kLong, nullptr)) != -1;) {
    if (c == 'r') files.ready = optarg;
    if (c == 'g') files.go = optarg;
    if (c == 'o') files.out = optarg;
    if (c == 't') tenant = std::atoi(optarg);
    if (c == '?') return 2;
  }
  files.wait_s = 30;
  const std::string behaviour = behaviourOf(tenant);
  if (behaviour == "never-ready") {
    while (true)
      sleepUs(100'000);
  }
  if (behaviour == "exit-before-ready") {
    std::fprintf(stderr, "fake tenant %d: cannot create a context\n", tenant);
    return 3;
  }
  if (behaviour == "slow-ready") sleepUs(300'000L * tenant);

  // The span, once the go file names it (for the behaviours that need it).
  std::optional<stmux::tools::Span> span;
  auto spanNow = [&] {
    if (!span) span = stmux::tools::readGo(files.go);
    return span;
  };
  bool said_ready = false;
  bool stalled = false;
  auto step = [&] {
    if (!said_ready && ::access(files.ready.c_str(), F_OK) == 0) {
      std::printf("ready_ns %llu\n", static_cast<unsigned long long>(realtimeNs()));
      std::fflush(stdout);
      said_ready = true;
    }
    const bool later = said_ready && spanNow() &&
                       realtimeNs() >= span->start_ns + (span->stop_ns - span->start_ns) / 2;
    const bool slow = behaviour == "slow-later" ? later : behaviour == "fast-later" && !later;
    if (behaviour == "busy") {
      const std::uint64_t until = realtimeNs() + 200'000;
      while (realtimeNs() < until) {
      }
    }
    sleepUs(slow ? 600 : 200);
    if (said_ready && spanNow() && realtimeNs() >= span->start_ns) {
      if (behaviour == "exit-in-span") {
        std::fprintf(stderr, "fake tenant %d: failing in the span\n", tenant);
        std::exit(1);
      }
      if (behaviour == "stall" && !stalled) {
        stalled = true;
        while (realtimeNs() < span->stop_ns + 10'000'000)
          sleepUs(1000);
      }
      // Runs half the span, then one step stalls past its end.
      if (behaviour == "stall-late" && later && !stalled) {
        stalled = true;
        while (realtimeNs() < span->stop_ns + 10'000'000)
          sleepUs(1000);
      }
      if (behaviour == "early-stop") {
        stmux::tools::TenantResult result;
        result.calls = 1;
        result.latencies_ns = {200'000};
        result.last_end_ns = span->start_ns + 1;
        std::exit(stmux::tools::writeResult(files.out, result) ? 0 : 1);
      }
    }
    return true;
  };
  return stmux::tools::runBarrierLoop(files, 1, 3, step);
}
