// How the fuzz targets read their input, and how each writes its seeds.
//
// Every target reads its input front to back as little records of integers
// and byte strings (ByteReader) and writes its seed corpus in the same format
// (ByteWriter), so a seed is what the target's own decoder expects and a
// mutation of it stays close to something meaningful. Past the end of the
// input every read returns zeros: a short input is still a whole program.
//
// A target run with STMUX_FUZZ_SEEDS=<dir> in its environment writes its seeds
// there and exits (the ctest entry does this first; tests/fuzz/CMakeLists.txt).
#pragma once

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "stmux/log.h"

namespace stmux::fuzz {

class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  bool empty() const { return pos_ >= size_; }
  std::size_t left() const { return empty() ? 0 : size_ - pos_; }

  template <class T>
  T integer() {
    static_assert(std::is_integral_v<T>);
    T value{};
    bytes(&value, sizeof(value));
    return value;
  }
  std::uint8_t u8() { return integer<std::uint8_t>(); }
  std::uint16_t u16() { return integer<std::uint16_t>(); }
  std::uint32_t u32() { return integer<std::uint32_t>(); }
  std::uint64_t u64() { return integer<std::uint64_t>(); }

  // Copies up to `n` bytes into `out`; the rest of `out` is zeroed.
  void bytes(void* out, std::size_t n) {
    const std::size_t take = n < left() ? n : left();
    if (take > 0) std::memcpy(out, data_ + pos_, take);
    if (take < n) std::memset(static_cast<std::uint8_t*>(out) + take, 0, n - take);
    pos_ += take;
  }
  std::vector<std::uint8_t> bytes(std::size_t n) {
    std::vector<std::uint8_t> out(n < left() ? n : left());
    bytes(out.data(), out.size());
    return out;
  }
  // A byte string of at most `max` bytes, its length read first (u16).
  std::vector<std::uint8_t> chunk(std::size_t max) {
    const std::size_t n = u16();
    return bytes(n < max ? n : max);
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

class ByteWriter {
 public:
  template <class T>
  ByteWriter& integer(T value) {
    static_assert(std::is_integral_v<T>);
    return bytes(&value, sizeof(value));
  }
  ByteWriter& u8(std::uint8_t v) { return integer(v); }
  ByteWriter& u16(std::uint16_t v) { return integer(v); }
  ByteWriter& u32(std::uint32_t v) { return integer(v); }
  ByteWriter& u64(std::uint64_t v) { return integer(v); }
  ByteWriter& bytes(const void* data, std::size_t n) {
    const auto* p = static_cast<const std::uint8_t*>(data);
    out_.insert(out_.end(), p, p + n);
    return *this;
  }
  template <class T>
  ByteWriter& object(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    return bytes(&value, sizeof(value));
  }
  ByteWriter& chunk(const void* data, std::size_t n) {
    u16(static_cast<std::uint16_t>(n));
    return bytes(data, n);
  }
  template <class T>
  ByteWriter& chunkOf(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    return chunk(&value, sizeof(value));
  }

  const std::vector<std::uint8_t>& data() const { return out_; }

 private:
  std::vector<std::uint8_t> out_;
};

// The seed-writing mode: the directory named by STMUX_FUZZ_SEEDS, or null.
inline const char* seedDirectory() {
  return std::getenv("STMUX_FUZZ_SEEDS");
}

inline void writeSeed(const char* dir, const std::string& name,
                      const std::vector<std::uint8_t>& data) {
  ::mkdir(dir, 0755);
  const std::string path = std::string(dir) + "/" + name;
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr || std::fwrite(data.data(), 1, data.size(), file) != data.size()) {
    std::fprintf(stderr, "stmux fuzz: cannot write seed %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(file);
}

// What every target's LLVMFuzzerInitialize does first: in the seed-writing
// mode, write the seeds and exit; otherwise keep stmux's logs quiet unless
// STMUX_LOG asks for them (a target runs millions of inputs).
inline void startTarget(void (*write_seeds)(const char* dir)) {
  if (const char* dir = seedDirectory()) {
    write_seeds(dir);
    std::exit(0);
  }
  const char* log = std::getenv("STMUX_LOG");
  auto spec = parseLogSpec(log != nullptr ? log : "off");
  setLogSpec(spec ? spec.value() : LogSpec::uniform(Level::kOff));
}

// Aborts with a message: what libFuzzer reports as a crash, with the input
// that caused it saved for replay.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "stmux fuzz: %s\n", what);
  std::abort();
}

#define STMUX_FUZZ_CHECK(condition)                                                     \
  do {                                                                                  \
    if (!(condition)) ::stmux::fuzz::fail("check failed: " #condition " at " __FILE__); \
  } while (0)

// The number of descriptors this process has open: a target that passes
// descriptors around checks it comes back to where it started.
inline int openDescriptors() {
  int count = 0;
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    while (const dirent* entry = ::readdir(dir))
      count += entry->d_name[0] != '.';
    ::closedir(dir);
  }
  return count;
}

// Lists this process's descriptors and what each is, for a failure message.
inline void printDescriptors() {
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    while (const dirent* entry = ::readdir(dir)) {
      if (entry->d_name[0] == '.') continue;
      char target[256] = {};
      const std::string path = std::string("/proc/self/fd/") + entry->d_name;
      (void)::readlink(path.c_str(), target, sizeof(target) - 1);
      std::fprintf(stderr, "  fd %s -> %s\n", entry->d_name, target);
    }
    ::closedir(dir);
  }
}

}  // namespace stmux::fuzz
