// Placeholders for the GPU subcommands, which live with the GPU backend: they register nothing.
#include "commands.h"

namespace fp4moe::cli {
void add_device_command(CLI::App&) {}
void add_bench_command(CLI::App&) {}
}  // namespace fp4moe::cli
