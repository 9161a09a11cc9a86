// Descriptors a tenant may have had a hand in, closed on a thread of their
// own.
//
// A close can block: the last close of a TCP socket with SO_LINGER and
// unsent data waits out its linger time, which its owner sets. A tenant can
// pass the daemon such a socket (SCM_RIGHTS) with any message, or leave it
// in its connection's queue, whose close releases it: on the server's
// thread, either stalled every tenant for as long as the tenant chose
// (found by review). Since Linux 6.16 the listening socket refuses passed
// descriptors (SO_PASSRIGHTS) and none arrive; on the kernels before, the
// connections and anything received from them close here.
#pragma once

#include <cstdint>
#include <utility>

#include "stmux/sys.h"

namespace stmux::daemon {

// Hands `fd` to the closer thread (started at the first call, and kept for
// the process's life: a close it waits in must not hold up the daemon's
// exit). Never blocks; an invalid `fd` is ignored. Closes inline instead
// once closesMayWait(false) was said, where no thread could be made, and in
// a process forked after the thread was (a child has no copy of it).
void closeAside(UniqueFd fd);

// Whether a close of a client's descriptor may wait: true until said
// otherwise. The server says false once its listening socket refuses passed
// descriptors (SO_PASSRIGHTS): then none reaches the daemon, and no thread
// is needed.
void closesMayWait(bool may_wait);

// Descriptors closeAside has closed so far, on the closer thread or inline
// in its stead; not those closed inline once closesMayWait(false) was said
// (tests). Makes the closer thread if it is not made yet.
std::uint64_t closedAside();

// A UniqueFd that closes aside: for the sockets of clients.
class AsideFd {
 public:
  AsideFd() = default;
  explicit AsideFd(UniqueFd fd) : fd_(std::move(fd)) {}
  AsideFd(AsideFd&&) noexcept = default;
  AsideFd& operator=(AsideFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::move(other.fd_);
    }
    return *this;
  }
  ~AsideFd() { reset(); }

  int get() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }
  void reset() {
    if (fd_.valid()) closeAside(std::move(fd_));
  }

 private:
  UniqueFd fd_;
};

}  // namespace stmux::daemon
