// Status and Result: how internal functions report failure without exceptions.
//
// Both shim and daemon return these from every fallible internal function. The
// shim must never let an exception cross an extern "C" boundary, so errors are
// values here; the message says what went wrong in words a user can act on.
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace stmux {

class [[nodiscard]] Status {
 public:
  static Status okStatus() { return Status(); }
  static Status error(std::string message) { return Status(std::move(message)); }

  bool ok() const { return !message_.has_value(); }
  explicit operator bool() const { return ok(); }
  // Empty for an ok status.
  const std::string& message() const {
    static const std::string kEmpty;
    return message_ ? *message_ : kEmpty;
  }

 private:
  Status() = default;
  explicit Status(std::string message) : message_(std::move(message)) {}
  std::optional<std::string> message_;
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT: must be an error

  bool ok() const { return value_.has_value(); }
  explicit operator bool() const { return ok(); }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  const std::string& message() const { return status_.message(); }
  Status status() const { return ok() ? Status::okStatus() : status_; }

 private:
  std::optional<T> value_;
  Status status_ = Status::okStatus();
};

}  // namespace stmux
