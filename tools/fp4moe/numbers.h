// Strict parsing of the numbers the command line takes: the whole text must be one decimal integer
// in the option's range (no sign on unsigned values, no leading '+', no spaces, no trailing text),
// so that `--seed -5` or `--experts-local 1:2:3` are refused instead of wrapped or truncated.
#pragma once
#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fp4moe/error.h"

namespace fp4moe::cli {

template <class T>
T parse_integer(std::string_view text, const char* option, T lo, T hi) {
  T v{};
  const char* end = text.data() + text.size();
  const auto r = text.empty() || text[0] == '+' ? std::from_chars_result{text.data(), std::errc::invalid_argument}
                                                : std::from_chars(text.data(), end, v);
  const bool ok = r.ec == std::errc() && r.ptr == end && v >= lo && v <= hi;
  FP4MOE_CHECK(ok, option << " expects an integer in [" << lo << ", " << hi << "], got '" << text
                          << "'" << (r.ec == std::errc::result_out_of_range ? " (out of range)" : ""));
  return v;
}

// "a,b,c" -> integers, each parsed as above; empty items are an error.
template <class T>
std::vector<T> parse_integer_list(std::string_view text, const char* option, T lo, T hi) {
  std::vector<T> out;
  size_t pos = 0;
  while (true) {
    const size_t comma = text.find(',', pos);
    out.push_back(parse_integer<T>(text.substr(pos, comma == std::string_view::npos ? std::string_view::npos
                                                                                    : comma - pos),
                                   option, lo, hi));
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  return out;
}

}  // namespace fp4moe::cli
