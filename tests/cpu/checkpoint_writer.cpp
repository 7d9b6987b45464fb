#include "cpu/checkpoint_writer.h"

#include <cstdlib>
#include <filesystem>

#include "fp4moe/error.h"

namespace fp4moe::test {

TempDir::TempDir() {
  std::string templ = (std::filesystem::temp_directory_path() / "fp4moe-ckpt-XXXXXX").string();
  FP4MOE_CHECK(mkdtemp(templ.data()) != nullptr, "cannot create a temporary directory " << templ);
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace fp4moe::test
