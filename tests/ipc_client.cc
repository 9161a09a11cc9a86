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
//   epilogues [--seed N] [--rounds N]
//                              every epilogue (bias, ReLU, GELU, each activation
//                              with a bias), strided batches of 3 with a bias,
//                              and plain requests of the same shapes, N times
//                              over (default 1: 10 epilogues), submitted at
//                              once behind two long GEMMs that hold the daemon
//                              at its batches in flight, so that they meet in
//                              one batch; each C against a float64 GEMM with
//                              the epilogue applied, each bias unchanged
//   flood --seconds S [--garbage] [--clients N]
//                              a hostile client (issue 14): for S seconds it
//                              pushes requests into its ring as fast as the
//                              ring takes them, re-arming its slots without
//                              waiting for their answers, so that only the
//                              daemon's own bound holds it; valid 64^3 GEMMs,
//                              or with --garbage operands whose memory handles
//                              are random bytes under a fresh allocation id
//                              each time (every one an open for the daemon's
//                              mapper that fails); with --clients N (1 to
//                              64), as N clients of one user, their rings
//                              filled in turn by one thread. Prints how many
//                              it pushed; stmux-fault's dos scenario runs it
// Always with --socket PATH (except probe). Exit 0: every answer was right.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <getopt.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shim/transport.h"
#include "stmux/epilogue.h"
#include "stmux/gemm.h"
#include "stmux/ring.h"
#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

namespace {

using stmux::Request;
using stmux::check::Buffers;
using stmux::check::GemmCase;
using stmux::check::StridedBatch;

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
  expect("C past its allocation", describe(c, a, b, small_c, device), stmux::kStatusDeclined,
         small_c, sentinel);
  Request lying = describe(c, a, b, small_c, device);
  lying.c.alloc_bytes = 64 * 64 * sizeof(float);  // claims the allocation is big enough
  expect("C with a lie about its size", lying, stmux::kStatusDeclined, small_c, sentinel);
  GemmCase fits{"fits", 0, 0, 32, 32, 32};
  Request offset = describe(fits, a, b, small_c, device);
  offset.c.offset = small_c.bytes - 16;  // starts four floats before the end
  expect("C starting near the end", offset, stmux::kStatusDeclined, small_c, sentinel);
  Request misaligned = describe(fits, a, b, small_c, device);
  misaligned.c.offset = 2;
  expect("C misaligned", misaligned, stmux::kStatusDeclined, small_c, sentinel);
  Request huge_ld = describe(fits, a, b, small_c, device);
  huge_ld.ldc = std::int64_t{1} << 40;
  expect("C with a huge leading dimension", huge_ld, stmux::kStatusDeclined, small_c, sentinel);
  Request past_a = describe(c, small_c, b, a, device);  // A is the small one now
  std::vector<float> a_before(64 * 64);
  EXIT_ON_CUDA_ERROR(cudaMemcpy(a_before.data(), a.base, a.bytes, cudaMemcpyDeviceToHost));
  expect("A past its allocation", past_a, stmux::kStatusDeclined, a, a_before);
  std::printf("overrun failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}

// One request of the epilogue mode: `count` problems of case `c` (a strided
// batch when more than one), with `epilogue` applied to each; the bias at
// `bias_offset` floats into its allocation.
struct EpilogueCase {
  std::string name;
  GemmCase c;
  std::uint32_t epilogue = stmux::kEpilogueNone;
  std::int64_t count = 1;
  std::int64_t bias_offset = 0;
};

std::vector<EpilogueCase> epilogueCases() {
  using stmux::kEpilogueBias, stmux::kEpilogueGelu, stmux::kEpilogueNone, stmux::kEpilogueRelu;
  // Every size and stride a multiple of 16 bytes, so that all of these share
  // one batched launch (strided batches included); beta != 0, so C's old
  // values count.
  const GemmCase shared{"shared", 0, 1, 36, 20, 28, 0, 0, 4, 1.0f, 0.5f};
  // Operands at odd offsets: each runs alone (cublasSgemm), and the epilogue
  // must keep to C's m x n block inside the padding of ldc.
  const GemmCase odd{"odd", 1, 0, 33, 17, 29, 2, 0, 3, -1.5f, 0.0f, 1, 2, 5};
  std::vector<EpilogueCase> cases;
  const auto add = [&](const char* name, const GemmCase& c, std::uint32_t epilogue,
                       std::int64_t count = 1, std::int64_t bias_offset = 0) {
    cases.push_back({c.name + "-" + name, c, epilogue, count, bias_offset});
  };
  add("plain", shared, kEpilogueNone);
  add("bias", shared, kEpilogueBias);
  add("relu", shared, kEpilogueRelu);
  add("gelu", shared, kEpilogueGelu);
  add("relu-bias", shared, kEpilogueRelu | kEpilogueBias, 1, 4);
  add("gelu-bias", shared, kEpilogueGelu | kEpilogueBias);
  add("strided3-bias", shared, kEpilogueBias, 3);
  add("strided3-gelu-bias", shared, kEpilogueGelu | kEpilogueBias, 3, 8);
  add("strided3-plain", shared, kEpilogueNone, 3);
  add("plain-again", shared, kEpilogueNone);
  add("plain", odd, kEpilogueNone);
  add("relu-bias", odd, kEpilogueRelu | kEpilogueBias, 1, 3);
  add("gelu", odd, kEpilogueGelu);
  return cases;
}

// C after an epilogue against the float64 GEMM with the epilogue applied
// (stmux/epilogue.h's own function, so the same formula), through
// check::verify: each element within the GEMM's FP32 bound carried through
// the epilogue (no slope is above 1.2: GELU's largest is 1.13), plus a few
// units in the last place for the epilogue's own arithmetic, which may round
// differently on the GPU; elements outside the m x n block exactly as they
// were.
stmux::check::Verdict verifyEpilogue(const GemmCase& c, const Buffers& in, const float* bias,
                                     std::uint32_t epilogue, const std::vector<float>& result) {
  stmux::check::Reference ref = stmux::check::reference(c, in);
  const double unit = c.math == stmux::check::kTf32Math ? 1.0 / 1024 : 1.0 / (1 << 23);
  const double allowed = unit * (2.0 * static_cast<double>(c.k) + 4.0);
  for (std::int64_t j = 0; j < c.n; ++j) {
    for (std::int64_t i = 0; i < c.m; ++i) {
      const std::size_t e = static_cast<std::size_t>(j * c.m + i);
      const double x = ref.expected[e];
      ref.expected[e] = stmux::applyEpilogue(epilogue, static_cast<float>(x), bias[i]);
      const double rounding = 1e-6 * (1.0 + std::fabs(x) + std::fabs(bias[i]));
      ref.scale[e] = 1.2 * ref.scale[e] + rounding / allowed;
    }
  }
  return stmux::check::verify(c, in, ref, result);
}

int epilogues(stmux::shim::Connection& connection, std::uint64_t seed, int rounds) {
  std::mt19937_64 random(seed);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  const stmux::Uuid device = deviceUuid();
  int failures = 0;
  struct Sent {
    EpilogueCase e;
    StridedBatch in;
    std::vector<float> bias;  // the whole allocation
    std::unique_ptr<Allocation> a, b, cc, bias_alloc;
    stmux::shim::Ticket ticket;
    bool submitted = false;
  };
  std::vector<Sent> sent;
  std::vector<EpilogueCase> cases;
  for (int round = 0; round < rounds; ++round) {
    for (EpilogueCase e : epilogueCases()) {
      if (rounds > 1) e.name += "-" + std::to_string(round);
      cases.push_back(std::move(e));
    }
  }
  for (const EpilogueCase& e : cases) {
    Sent s;
    s.e = e;
    s.in = stmux::check::makeStridedInputs(e.c, e.count, false, random);
    s.bias.assign(static_cast<std::size_t>(e.bias_offset + e.c.m + 64), stmux::check::kSentinel);
    for (std::int64_t i = 0; i < e.c.m; ++i)
      s.bias[e.bias_offset + i] = value(random);
    s.a = std::make_unique<Allocation>(s.in.a.size());
    s.b = std::make_unique<Allocation>(s.in.b.size());
    s.cc = std::make_unique<Allocation>(s.in.c_all.size());
    s.bias_alloc = std::make_unique<Allocation>(s.bias.size());
    EXIT_ON_CUDA_ERROR(cudaMemcpy(s.a->base, s.in.a.data(), s.a->bytes, cudaMemcpyHostToDevice));
    EXIT_ON_CUDA_ERROR(cudaMemcpy(s.b->base, s.in.b.data(), s.b->bytes, cudaMemcpyHostToDevice));
    EXIT_ON_CUDA_ERROR(
        cudaMemcpy(s.cc->base, s.in.c_all.data(), s.cc->bytes, cudaMemcpyHostToDevice));
    EXIT_ON_CUDA_ERROR(
        cudaMemcpy(s.bias_alloc->base, s.bias.data(), s.bias_alloc->bytes, cudaMemcpyHostToDevice));
    sent.push_back(std::move(s));
  }
  // The ballast: two GEMMs of some milliseconds each, values irrelevant. The
  // daemon launches each alone and then, with two batches in flight, holds
  // what comes next until one is done: the cases, all waiting by then (their
  // memory mapped too: four allocations a case, longer ballast for more; at
  // 8192 for four rounds, a new daemon's 208 first opens once outlasted it on
  // an H100, and the cases were split over batches).
  const std::int64_t kBallast = rounds > 1 ? 12288 : 4096;
  Allocation ballast_a(kBallast * kBallast), ballast_b(kBallast * kBallast);
  Allocation ballast_c[2] = {Allocation(kBallast * kBallast), Allocation(kBallast * kBallast)};
  for (const Allocation* m : {&ballast_a, &ballast_b})
    EXIT_ON_CUDA_ERROR(cudaMemset(m->base, 0, m->bytes));
  // Copies from pageable memory may return before their DMA lands: the daemon,
  // in another process, must not start before they have.
  EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
  const GemmCase ballast{"ballast", 0, 0, kBallast, kBallast, kBallast};
  std::vector<stmux::shim::Ticket> ballast_tickets;
  for (int i = 0; i < 2; ++i) {
    Request request = describe(ballast, ballast_a, ballast_b, ballast_c[i], device);
    auto ticket = connection.submit(request, stmux::nowNs() + kTimeoutNs);
    if (!ticket) {
      std::printf("FAIL ballast: %s\n", ticket.message().c_str());
      return 1;
    }
    ballast_tickets.push_back(ticket.value());
  }
  for (Sent& s : sent) {
    Request r = describe(s.e.c, *s.a, *s.b, *s.cc, device);
    if (s.e.count > 1) {
      r.batch_count = s.e.count;
      r.stride_a = s.in.stride_a, r.stride_b = s.in.stride_b, r.stride_c = s.in.stride_c;
    }
    r.epilogue = s.e.epilogue;
    if ((s.e.epilogue & stmux::kEpilogueBias) != 0) r.bias = s.bias_alloc->operand(s.e.bias_offset);
    auto ticket = connection.submit(r, stmux::nowNs() + kTimeoutNs);
    if (!ticket) {
      std::printf("FAIL %s: %s\n", s.e.name.c_str(), ticket.message().c_str());
      ++failures;
      continue;
    }
    s.ticket = ticket.value();
    s.submitted = true;
  }
  for (const stmux::shim::Ticket& ticket : ballast_tickets) {
    auto result = connection.wait(ticket, stmux::nowNs() + kTimeoutNs, 20'000);
    connection.release(ticket);
    if (result.outcome != stmux::WaitOutcome::kDone || result.status != stmux::kStatusSuccess) {
      std::printf("FAIL ballast: outcome %d status %d\n", static_cast<int>(result.outcome),
                  result.status);
      ++failures;
    }
  }
  for (Sent& s : sent) {
    if (!s.submitted) continue;
    auto result = connection.wait(s.ticket, stmux::nowNs() + kTimeoutNs, 20'000);
    connection.release(s.ticket);
    if (result.outcome != stmux::WaitOutcome::kDone || result.status != stmux::kStatusSuccess) {
      std::printf("FAIL %s: outcome %d status %d\n", s.e.name.c_str(),
                  static_cast<int>(result.outcome), result.status);
      ++failures;
      continue;
    }
    std::vector<float> c_all(s.in.c_all.size()), bias(s.bias.size());
    EXIT_ON_CUDA_ERROR(cudaMemcpy(c_all.data(), s.cc->base, s.cc->bytes, cudaMemcpyDeviceToHost));
    EXIT_ON_CUDA_ERROR(
        cudaMemcpy(bias.data(), s.bias_alloc->base, s.bias_alloc->bytes, cudaMemcpyDeviceToHost));
    stmux::check::Verdict all;
    for (std::int64_t i = 0; i < s.e.count && all.ok; ++i) {
      const auto from = c_all.begin() + i * s.in.stride_c;
      const std::vector<float> result(from, from + s.in.stride_c);
      const stmux::check::Verdict one = verifyEpilogue(
          s.e.c, s.in.problems[i], s.bias.data() + s.e.bias_offset, s.e.epilogue, result);
      if (!one.ok) {
        all = one;
        all.problem = "problem " + std::to_string(i) + ": " + one.problem;
      }
      all.worst = std::max(all.worst, one.worst);
    }
    if (all.ok && bias != s.bias) {
      all.ok = false;
      all.problem = "the bias changed";
    }
    if (all.ok) {
      std::printf("ok %s worst %.3f\n", s.e.name.c_str(), all.worst);
    } else {
      std::printf("FAIL %s: %s\n", s.e.name.c_str(), all.problem.c_str());
      ++failures;
    }
  }
  std::printf("epilogues failures %d\n", failures);
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

// Each of `connections` floods its own ring, in turn, on this one thread: as
// many clients of one user as there are connections, at the CPU cost of one.
int flood(const std::vector<stmux::shim::Connection*>& connections, double seconds, bool garbage,
          std::uint64_t seed) {
  std::mt19937_64 random(seed);
  const GemmCase shape{"flood", 0, 0, 64, 64, 64};
  Allocation a(64 * 64), b(64 * 64), c(64 * 64);
  for (const Allocation* m : {&a, &b, &c})
    EXIT_ON_CUDA_ERROR(cudaMemset(m->base, 0, m->bytes));
  EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
  struct Flooded {
    stmux::shim::Connection* connection;
    stmux::RingProducer<Request> ring;
    std::uint32_t slots;
    std::uint32_t next = 0;  // its next slot
  };
  std::deque<Flooded> floods;  // in place: a ring producer stays where it is made
  for (stmux::shim::Connection* connection : connections) {
    stmux::SegmentView& view = connection->view();
    floods.emplace_back(
        connection,
        stmux::RingProducer<Request>(view.ringHeader(), view.cells(), view.layout().ring_capacity),
        connection->slotCount());
  }
  Request request = describe(shape, a, b, c, deviceUuid());
  // Ids far above the ones the Allocations take, each used once.
  std::uint64_t garbage_id = std::uint64_t{1} << 40;
  const auto forge = [&](stmux::OperandDesc& operand) {
    operand.alloc_id = garbage_id++;
    // Where nothing of this process lies (so that no mapping of its own real
    // memory is in the way), 2 MiB aligned as cudaMalloc's are.
    operand.base = (std::uint64_t{0x6000} << 32) + (random() % (std::uint64_t{1} << 20) << 21);
    for (auto& byte : operand.handle.bytes)
      byte = static_cast<std::uint8_t>(random());
  };
  std::uint64_t pushed = 0, full = 0, unsent = 0;
  const std::uint64_t start = stmux::nowNs();
  const std::uint64_t end = start + static_cast<std::uint64_t>(seconds * 1e9);
  std::string ended = "its time ran out";
  bool hung_up = false;
  while (!hung_up && stmux::nowNs() < end) {
    bool any = false;  // pushed into some ring this round
    for (Flooded& f : floods) {
      stmux::SegmentView& view = f.connection->view();
      request.slot = f.next++ % f.slots;
      request.generation = stmux::slotArm(view.slot(request.slot));
      if (garbage) {
        forge(request.a);
        forge(request.b);
        forge(request.c);
      }
      if (f.ring.tryPush(request)) {
        ++pushed;
        any = true;
        continue;
      }
      // Full, and the daemon may be asleep: a control message wakes it (this
      // client bypasses the shim's doorbell along with its slots). A message
      // that does not go is the daemon no longer reading them (its notices
      // held back while its executor is behind, the socket's buffer full),
      // not a hang-up, unless the connection is gone.
      ++full;
      if (!f.connection->sendRelease({0}).ok()) {
        ++unsent;
        if (!f.connection->alive()) {
          char why[64];
          std::snprintf(why, sizeof why, "the daemon hung up on it after %.1f s",
                        static_cast<double>(stmux::nowNs() - start) / 1e9);
          ended = why;
          hung_up = true;
          break;
        }
      }
    }
    if (!any) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  std::printf(
      "flood pushed %llu %s through %zu client(s), the rings full %llu times (%llu "
      "wake-ups not taken); %s\n",
      static_cast<unsigned long long>(pushed),
      garbage ? "requests with garbage handles" : "valid requests", floods.size(),
      static_cast<unsigned long long>(full), static_cast<unsigned long long>(unsent),
      ended.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: stmux-ipc-client probe | cases|overrun|epilogues|flood --socket PATH "
                 "[--quick] [--together] [--unaligned] [--seed N] [--rounds N] [--seconds S] "
                 "[--garbage] [--clients N]\n");
    return 2;
  }
  const std::string mode = argv[1];
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (mode == "facts") return facts();
  if (mode == "probe") {
    if (stmux::noDevice(error, devices)) {
      std::printf("no CUDA device: %s\n", stmux::noDeviceReason(error).c_str());
      return 77;
    }
    // A device that fails is no reason to skip: the GPU tests fail, saying why.
    if (error != cudaSuccess) {
      std::printf("the CUDA device cannot be used: %s\n", cudaGetErrorString(error));
      return 1;
    }
    return 0;
  }
  std::string socket;
  bool quick = false, together = false, unaligned = false, garbage = false;
  int rounds = 1, clients = 1;
  double seconds = 0;
  std::uint64_t seed = stmux::nowNs() ^ static_cast<std::uint64_t>(getpid());
  static const option kLong[] = {
      {"socket", required_argument, nullptr, 's'},  {"quick", no_argument, nullptr, 'q'},
      {"together", no_argument, nullptr, 't'},      {"unaligned", no_argument, nullptr, 'u'},
      {"seed", required_argument, nullptr, 'r'},    {"rounds", required_argument, nullptr, 'n'},
      {"seconds", required_argument, nullptr, 'S'}, {"garbage", no_argument, nullptr, 'g'},
      {"clients", required_argument, nullptr, 'c'}, {nullptr, 0, nullptr, 0}};
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
    else if (c == 'n') {
      rounds = std::atoi(optarg);
      if (rounds < 1 || rounds > 16) {
        std::fprintf(stderr, "ipc_client: --rounds takes 1 to 16, not '%s'\n", optarg);
        return 2;
      }
    } else if (c == 'S') {
      seconds = std::atof(optarg);
      if (!(seconds >= 0.1 && seconds <= 3600)) {
        std::fprintf(stderr, "ipc_client: --seconds takes 0.1 to 3600, not '%s'\n", optarg);
        return 2;
      }
    } else if (c == 'g') {
      garbage = true;
    } else if (c == 'c') {
      clients = std::atoi(optarg);
      if (clients < 1 || clients > 64) {
        std::fprintf(stderr, "ipc_client: --clients takes 1 to 64, not '%s'\n", optarg);
        return 2;
      }
    } else {
      return 2;
    }
  }
  if (socket.empty() ||
      (mode != "cases" && mode != "overrun" && mode != "epilogues" && mode != "flood")) {
    return 2;
  }
  if (mode == "flood" && seconds == 0) {
    std::fprintf(stderr, "ipc_client: flood needs --seconds\n");
    return 2;
  }
  if (stmux::noDevice(error, devices)) return 77;
  if (error != cudaSuccess) {
    std::printf("FAIL the CUDA device cannot be used: %s\n", cudaGetErrorString(error));
    return 1;
  }
  stmux::shim::ConnectOptions options;
  options.socket_path = socket;
  options.name = "ipc_client";
  if (clients > 1 && mode != "flood") {
    std::fprintf(stderr, "ipc_client: --clients is for flood only\n");
    return 2;
  }
  std::vector<std::unique_ptr<stmux::shim::Connection>> connections;
  for (int i = 0; i < clients; ++i) {
    auto opened = stmux::shim::Connection::open(options);
    if (!opened) {
      std::fprintf(stderr, "ipc_client: %s\n", opened.message().c_str());
      return 4;
    }
    connections.push_back(std::move(opened.value()));
  }
  auto& connection = connections.front();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  if (mode == "epilogues") return epilogues(*connection, seed, rounds);
  if (mode == "flood") {
    std::vector<stmux::shim::Connection*> all;
    for (const auto& c : connections)
      all.push_back(c.get());
    return flood(all, seconds, garbage, seed);
  }
  return mode == "cases" ? cases(*connection, quick, together, unaligned, seed)
                         : overrun(*connection);
}
