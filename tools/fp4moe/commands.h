// Subcommands of the fp4moe program. Each file in tools/fp4moe adds its own.
#pragma once
#include <CLI/CLI.hpp>

namespace fp4moe::cli {
void add_presets_command(CLI::App& app);
void add_check_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_device_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_prepack_command(CLI::App& app);
void add_plan_command(CLI::App& app);
}  // namespace fp4moe::cli
