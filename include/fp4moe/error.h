// Errors: every failure the library reports is an fp4moe::Error carrying the file and line that
// detected it and a sentence the caller can act on.
#pragma once
#include <cstdint>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace fp4moe {

class Error : public std::runtime_error {
 public:
  Error(const std::string& what, const char* file, int line)
      : std::runtime_error(what + " [" + file + ":" + std::to_string(line) + "]") {}
};

namespace detail {
[[noreturn]] inline void fail(const std::string& msg, const char* file, int line) {
  throw Error(msg, file, line);
}

// Builds an error message with `<<` like a stream, without iostreams.
// NOTES: std::ostream number formatting goes through locale facets; in a shared object built with
// hidden visibility (Python extensions) the facet ids the object instantiates itself are private
// copies that the process's C++ library never registered, and formatting a number crashes.
class Message {
 public:
  Message& operator<<(const std::string& s) { text_ += s; return *this; }
  Message& operator<<(std::string_view s) { text_.append(s.data(), s.size()); return *this; }
  Message& operator<<(const char* s) { text_ += s != nullptr ? s : "(null)"; return *this; }
  Message& operator<<(char c) { text_ += c; return *this; }
  Message& operator<<(bool b) { text_ += b ? "true" : "false"; return *this; }
  template <class T>
    requires std::is_integral_v<T> || std::is_enum_v<T>
  Message& operator<<(T v) {
    if constexpr (std::is_enum_v<T>) {
      text_ += std::to_string(static_cast<long long>(v));
    } else if constexpr (std::is_signed_v<T>) {
      text_ += std::to_string(static_cast<long long>(v));
    } else {
      text_ += std::to_string(static_cast<unsigned long long>(v));
    }
    return *this;
  }
  Message& operator<<(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.7g", v);
    text_ += buf;
    return *this;
  }
  Message& operator<<(float v) { return *this << static_cast<double>(v); }
  Message& operator<<(const void* p) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", p);
    text_ += buf;
    return *this;
  }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

// "0x7F": a byte in hex for messages (Message has no stream manipulators).
inline std::string hex_byte(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02X", v & 0xFFu);
  return buf;
}

// Sizes computed from caller input: a * b and a + b in 64-bit arithmetic, throwing an Error that
// names `what` instead of wrapping. Both operands must be non-negative.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) {
    Message m;
    m << what << ": " << a << " * " << b << " overflows 64-bit arithmetic (or is negative); the "
      << "sizes are too large";
    throw Error(m.str(), __FILE__, __LINE__);
  }
  return r;
}
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) {
    Message m;
    m << what << ": " << a << " + " << b << " overflows 64-bit arithmetic (or is negative); the "
      << "sizes are too large";
    throw Error(m.str(), __FILE__, __LINE__);
  }
  return r;
}

// Throws an Error naming `what` and the byte count when `bytes` exceed the machine's physical
// memory, before anything of that size is allocated (a bad_alloc or the OOM killer later says less).
void check_host_bytes(int64_t bytes, const char* what);
}  // namespace detail

}  // namespace fp4moe

// FP4MOE_CHECK(cond, streamed message): throws fp4moe::Error when cond is false.
#define FP4MOE_CHECK(cond, ...)                                                      \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      ::fp4moe::detail::Message fp4moe_msg_;                                         \
      fp4moe_msg_ << __VA_ARGS__;                                                    \
      ::fp4moe::detail::fail(fp4moe_msg_.str(), __FILE__, __LINE__);                 \
    }                                                                                \
  } while (0)

#define FP4MOE_FAIL(...) FP4MOE_CHECK(false, __VA_ARGS__)
