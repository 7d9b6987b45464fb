// fp4moe: command-line front end of the library.
#include <cstdio>
#include <exception>

#include "commands.h"
#include "fp4moe/error.h"

int main(int argc, char** argv) {
  CLI::App app{"fp4moe: FP4 Mixture-of-Experts layers on Hopper"};
  app.require_subcommand(1);
  fp4moe::cli::add_presets_command(app);
  fp4moe::cli::add_check_command(app);
  fp4moe::cli::add_inspect_command(app);
  fp4moe::cli::add_device_command(app);
  fp4moe::cli::add_bench_command(app);
  fp4moe::cli::add_prepack_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fp4moe: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
