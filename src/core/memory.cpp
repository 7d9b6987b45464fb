// Host memory checks for allocations whose size comes from the caller.
#include <unistd.h>

#include "fp4moe/error.h"

namespace fp4moe::detail {

void check_host_bytes(int64_t bytes, const char* what) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return;  // unknown: let the allocation decide
  const int64_t total = int64_t{pages} * page;
  FP4MOE_CHECK(bytes <= total, what << " needs " << bytes << " bytes (" << double(bytes) / double(1LL << 30)
                                    << " GiB) of host memory, more than this machine has (" << total
                                    << " bytes); use fewer tokens or a smaller layer");
}

}  // namespace fp4moe::detail
