// stmux-ipc-client: a test client that talks to stmuxd through the real
// transport and real CUDA IPC, without the shim: the daemon's own tests.
//
//   probe                      exit 0 if there is a CUDA device, 77 if not
//   cases [--quick] [--together] [--unaligned] [--seed N]
//                              the case matrix through the daemon, each result
//                              against a float64 reference; --together submits
//                              every case at once, so shapes mix in batches;
//                              --unaligned: instead, four shapes twelve times
//                              each, half of them with operands at offsets of
//                              1 to 3 floats, so that such operands meet in one
//                              batch
//   facts                      what CUDA IPC does when an address is reused:
//                              the handles and buffer ids of an allocation and
//                              of the one made at its address after a free
//   overrun                    operands past their allocation, misaligned, or
//                              described with a lie about the allocation's
//                              size: each must come back INVALID_VALUE and
//                              leave memory alone
// Always with --socket PATH (except probe). Exit 0: every answer was right.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <getopt.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "shim/transport.h"
#include "stmux/gemm.h"
#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

namespace {

using stmux::Request;
using stmux::check::Buffers;
using stmux::check::GemmCase;

constexpr std::uint64_t kTimeoutNs = 60'000'000'000ull;

// One device allocation, exported once.
struct Allocation {
  float* base = nullptr;
  std::size_t bytes = 0;
  std::uint64_t id = 0;
  stmux::IpcHandle handle{};

  explicit Allocation(std::size_t floats) : bytes(floats * sizeof(float)) {
    static std::uint64_t next = 1;
    EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&base), bytes));
    id = next++;
    cudaIpcMemHandle_t h;
    EXIT_ON_CUDA_ERROR(cudaIpcGetMemHandle(&h, base));
    std::memcpy(handle.bytes, &h, sizeof(h));
  }
  ~Allocation() { cudaFree(base); }
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  stmux::OperandDesc operand(std::int64_t offset_floats) const {
    return stmux::OperandDesc{id, reinterpret_cast<std::uint64_t>(base),
                              static_cast<std::uint64_t>(offset_floats) * sizeof(float), bytes,
                              handle};
  }
};

stmux::Uuid deviceUuid() {
  int device = 0;
  EXIT_ON_CUDA_ERROR(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  EXIT_ON_CUDA_ERROR(cudaGetDeviceProperties(&prop, device));
  stmux::Uuid uuid;
  std::memcpy(uuid.bytes, prop.uuid.bytes, sizeof(uuid.bytes));
  return uuid;
}

Request describe(const GemmCase& c, const Allocation& a, const Allocation& b, const Allocation& cc,
                 const stmux::Uuid& device) {
  Request r{};
  r.op = static_cast<std::uint32_t>(stmux::Op::kSgemm);
  r.transa = c.transa, r.transb = c.transb;
  r.m = c.m, r.n = c.n, r.k = c.k;
  r.lda = c.lda(), r.ldb = c.ldb(), r.ldc = c.ldc();
  r.alpha = c.alpha, r.beta = c.beta;
  r.math_mode = static_cast<std::uint32_t>(c.math);
  r.device = device;
  const auto extents = stmux::gemmExtents(stmux::GemmShape::of(r));
  // Operands that are never touched are not described, as the shim does.
  if (extents->a != 0) r.a = a.operand(c.a_offset);
  if (extents->b != 0) r.b = b.operand(c.b_offset);
  if (extents->c != 0) r.c = cc.operand(c.c_offset);
  return r;
}

struct Pending {
  GemmCase c;
  Buffers in;
  std::unique_ptr<Allocation> a, b, cc;
  stmux::shim::Ticket ticket;
};

// Requests that would share batched and grouped launches, half of them with
// an operand off 16-byte alignment.
std::vector<GemmCase> unalignedCases() {
  std::vector<GemmCase> cases;
  const std::int64_t shapes[4][5] = {
      {0, 0, 64, 48, 40}, {1, 0, 33, 20, 17}, {0, 1, 96, 8, 64}, {1, 1, 16, 16, 16}};
  for (int i = 0; i < 48; ++i) {
    const auto& s = shapes[i % 4];
    GemmCase c{"unaligned-" + std::to_string(i),
               static_cast<int>(s[0]),
               static_cast<int>(s[1]),
               s[2],
               s[3],
               s[4]};
    c.beta = (i / 4) % 2 == 0 ? 0.0f : 0.5f;
    const bool odd = (i / 8) % 2 == 1;
    c.a_offset = odd ? 1 + i % 3 : 4 * (i % 2);
    c.b_offset = odd ? 1 + (i + 1) % 3 : 0;
    c.c_offset = odd ? 1 + (i + 2) % 3 : 8;
    cases.push_back(c);
  }
  return cases;
}

int cases(stmux::shim::Connection& connection, bool quick, bool together, bool unaligned,
          std::uint64_t seed) {
  std::mt19937_64 random(seed);
  const stmux::Uuid device = deviceUuid();
  int failures = 0;
  std::vector<Pending> waiting;
  auto finish = [&](Pending& p) {
    auto result = connection.wait(p.ticket, stmux::nowNs() + kTimeoutNs, 20'000);
    if (result.outcome != stmux::WaitOutcome::kDone) {
      std::printf("FAIL %s: no answer (outcome %d)\n", p.c.name.c_str(),
                  static_cast<int>(result.outcome));
      ++failures;
      return;
    }
    connection.release(p.ticket);
    if (result.status != stmux::kStatusSuccess) {
      std::printf("FAIL %s: status %d\n", p.c.name.c_str(), result.status);
      ++failures;
      return;
    }
    std::vector<float> out(p.in.c.size());
    EXIT_ON_CUDA_ERROR(cudaMemcpy(out.data(), p.cc->base, p.cc->bytes, cudaMemcpyDeviceToHost));
    const auto verdict = stmux::check::verify(p.c, p.in, out);
    if (verdict.ok) {
      std::printf("ok %s worst %.3f\n", p.c.name.c_str(), verdict.worst);
    } else {
      std::printf("FAIL %s: %s\n", p.c.name.c_str(), verdict.problem.c_str());
      ++failures;
    }
  };
  for (const GemmCase& c : unaligned ? unalignedCases() : stmux::check::caseMatrix(quick)) {
    Pending p{c,
              stmux::check::makeInputs(c, random),
              std::make_unique<Allocation>(c.aFloats()),
              std::make_unique<Allocation>(c.bFloats()),
              std::make_unique<Allocation>(c.cFloats()),
              {}};
    EXIT_ON_CUDA_ERROR(cudaMemcpy(p.a->base, p.in.a.data(), p.a->bytes, cudaMemcpyHostToDevice));
    EXIT_ON_CUDA_ERROR(cudaMemcpy(p.b->base, p.in.b.data(), p.b->bytes, cudaMemcpyHostToDevice));
    EXIT_ON_CUDA_ERROR(cudaMemcpy(p.cc->base, p.in.c.data(), p.cc->bytes, cudaMemcpyHostToDevice));
    // A copy from pageable memory may return before its DMA lands: the daemon,
    // in another process, must not start before it has.
    EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
    Request request = describe(c, *p.a, *p.b, *p.cc, device);
    auto ticket = connection.submit(request, stmux::nowNs() + kTimeoutNs);
    if (!ticket) {
      std::printf("FAIL %s: %s\n", c.name.c_str(), ticket.message().c_str());
      ++failures;
      continue;
    }
    p.ticket = ticket.value();
    waiting.push_back(std::move(p));
    if (!together) {
      finish(waiting.back());
      waiting.clear();
    }
  }
  for (Pending& p : waiting)
    finish(p);
  std::printf("cases failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}

int overrun(stmux::shim::Connection& connection) {
  const stmux::Uuid device = deviceUuid();
  int failures = 0;
  auto expect = [&](const char* what, Request request, std::int32_t wanted,
                    const Allocation& watched, const std::vector<float>& before) {
    auto ticket = connection.submit(request, stmux::nowNs() + kTimeoutNs);
    if (!ticket) {
      std::printf("FAIL %s: %s\n", what, ticket.message().c_str());
      ++failures;
      return;
    }
    auto result = connection.wait(ticket.value(), stmux::nowNs() + kTimeoutNs, 20'000);
    connection.release(ticket.value());
    std::vector<float> after(before.size());
    EXIT_ON_CUDA_ERROR(
        cudaMemcpy(after.data(), watched.base, watched.bytes, cudaMemcpyDeviceToHost));
    const bool untouched = std::memcmp(after.data(), before.data(), watched.bytes) == 0;
    if (result.outcome != stmux::WaitOutcome::kDone || result.status != wanted || !untouched) {
      std::printf("FAIL %s: status %d (wanted %d), C %s\n", what, result.status, wanted,
                  untouched ? "untouched" : "CHANGED");
      ++failures;
    } else {
      std::printf("ok %s\n", what);
    }
  };
  // C is 64 x 64 but its allocation holds 64 x 32 floats.
  GemmCase c{"overrun", 0, 0, 64, 64, 64};
  Allocation a(64 * 64), b(64 * 64), small_c(64 * 32);
  std::vector<float> sentinel(64 * 32, stmux::check::kSentinel);
  EXIT_ON_CUDA_ERROR(
      cudaMemcpy(small_c.base, sentinel.data(), small_c.bytes, cudaMemcpyHostToDevice));
  EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
  expect("C past its allocation", describe(c, a, b, small_c, device), stmux::kStatusInvalidValue,
         small_c, sentinel);
  Request lying = describe(c, a, b, small_c, device);
  lying.c.alloc_bytes = 64 * 64 * sizeof(float);  // claims the allocation is big enough
  expect("C with a lie about its size", lying, stmux::kStatusInvalidValue, small_c, sentinel);
  GemmCase fits{"fits", 0, 0, 32, 32, 32};
  Request offset = describe(fits, a, b, small_c, device);
  offset.c.offset = small_c.bytes - 16;  // starts four floats before the end
  expect("C starting near the end", offset, stmux::kStatusInvalidValue, small_c, sentinel);
  Request misaligned = describe(fits, a, b, small_c, device);
  misaligned.c.offset = 2;
  expect("C misaligned", misaligned, stmux::kStatusInvalidValue, small_c, sentinel);
  Request huge_ld = describe(fits, a, b, small_c, device);
  huge_ld.ldc = std::int64_t{1} << 40;
  expect("C with a huge leading dimension", huge_ld, stmux::kStatusInvalidValue, small_c, sentinel);
  Request past_a = describe(c, small_c, b, a, device);  // A is the small one now
  std::vector<float> a_before(64 * 64);
  EXIT_ON_CUDA_ERROR(cudaMemcpy(a_before.data(), a.base, a.bytes, cudaMemcpyDeviceToHost));
  expect("A past its allocation", past_a, stmux::kStatusInvalidValue, a, a_before);
  std::printf("overrun failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}

// An allocation freed and another made: same address? same handle bytes?
int facts() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  EXIT_ON_CUDA_ERROR(cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &fn, 4000,
                                                      cudaEnableDefault, &found));
  auto getAttribute = reinterpret_cast<PFN_cuPointerGetAttribute_v4000>(fn);
  for (std::size_t bytes : {std::size_t{4096}, std::size_t{1} << 20, std::size_t{64} << 20}) {
    int same_address = 0, same_handle = 0;
    for (int round = 0; round < 8; ++round) {
      void* first = nullptr;
      EXIT_ON_CUDA_ERROR(cudaMalloc(&first, bytes));
      cudaIpcMemHandle_t h1, h2;
      EXIT_ON_CUDA_ERROR(cudaIpcGetMemHandle(&h1, first));
      unsigned long long id1 = 0, id2 = 0;
      getAttribute(&id1, CU_POINTER_ATTRIBUTE_BUFFER_ID, reinterpret_cast<CUdeviceptr>(first));
      EXIT_ON_CUDA_ERROR(cudaFree(first));
      void* second = nullptr;
      EXIT_ON_CUDA_ERROR(cudaMalloc(&second, bytes));
      EXIT_ON_CUDA_ERROR(cudaIpcGetMemHandle(&h2, second));
      getAttribute(&id2, CU_POINTER_ATTRIBUTE_BUFFER_ID, reinterpret_cast<CUdeviceptr>(second));
      same_address += first == second;
      same_handle += std::memcmp(&h1, &h2, sizeof(h1)) == 0;
      if (round == 0) {
        std::printf("bytes %zu address %s buffer ids %llu -> %llu handle %s\n", bytes,
                    first == second ? "reused" : "new", id1, id2,
                    std::memcmp(&h1, &h2, sizeof(h1)) == 0 ? "IDENTICAL" : "differs");
      }
      EXIT_ON_CUDA_ERROR(cudaFree(second));
    }
    std::printf("bytes %zu: same address %d of 8, identical handle %d of 8\n", bytes, same_address,
                same_handle);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: stmux-ipc-client probe | cases|overrun --socket PATH "
                 "[--quick] [--together] [--unaligned] [--seed N]\n");
    return 2;
  }
  const std::string mode = argv[1];
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (mode == "facts") return facts();
  if (mode == "probe") {
    if (error != cudaSuccess || devices == 0) {
      std::printf("no CUDA device: %s\n", noDeviceReason(error).c_str());
      return 77;
    }
    return 0;
  }
  std::string socket;
  bool quick = false, together = false, unaligned = false;
  std::uint64_t seed = stmux::nowNs() ^ static_cast<std::uint64_t>(getpid());
  static const option kLong[] = {
      {"socket", required_argument, nullptr, 's'}, {"quick", no_argument, nullptr, 'q'},
      {"together", no_argument, nullptr, 't'},     {"unaligned", no_argument, nullptr, 'u'},
      {"seed", required_argument, nullptr, 'r'},   {nullptr, 0, nullptr, 0}};
  optind = 2;
  for (int c; (c = getopt_long(argc, argv, "", kLong, nullptr)) != -1;) {
    if (c == 's')
      socket = optarg;
    else if (c == 'q')
      quick = true;
    else if (c == 't')
      together = true;
    else if (c == 'u')
      unaligned = true;
    else if (c == 'r')
      seed = std::strtoull(optarg, nullptr, 10);
    else
      return 2;
  }
  if (socket.empty() || (mode != "cases" && mode != "overrun")) return 2;
  if (error != cudaSuccess || devices == 0) return 77;
  stmux::shim::ConnectOptions options;
  options.socket_path = socket;
  options.name = "ipc_client";
  auto connection = stmux::shim::Connection::open(options);
  if (!connection) {
    std::fprintf(stderr, "ipc_client: %s\n", connection.message().c_str());
    return 4;
  }
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return mode == "cases" ? cases(*connection.value(), quick, together, unaligned, seed)
                         : overrun(*connection.value());
}
