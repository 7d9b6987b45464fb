// Errors: every failure the library reports is an fp4moe::Error carrying the file and line that
// detected it and a sentence the caller can act on.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

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
}  // namespace detail

}  // namespace fp4moe

// FP4MOE_CHECK(cond, streamed message): throws fp4moe::Error when cond is false.
#define FP4MOE_CHECK(cond, ...)                                                      \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::ostringstream fp4moe_msg_;                                                \
      fp4moe_msg_ << __VA_ARGS__;                                                    \
      ::fp4moe::detail::fail(fp4moe_msg_.str(), __FILE__, __LINE__);                 \
    }                                                                                \
  } while (0)

#define FP4MOE_FAIL(...) FP4MOE_CHECK(false, __VA_ARGS__)
