// fp4moe: command-line front end of the library.
//
// Exit status (docs/cli.md): 0 success; 1 any error (bad command line, bad input, library error),
// printed as `fp4moe: error: <sentence>`; 2 a check that ran and failed (`check`, `device`).
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "commands.h"
#include "fp4moe/error.h"

namespace {

std::string command_list(CLI::App& app) {
  std::string s;
  for (const CLI::App* c : app.get_subcommands({})) s += (s.empty() ? "" : ", ") + c->get_name();
  return s;
}

int fail(const std::string& msg) {
  std::fprintf(stderr, "fp4moe: error: %s\n", msg.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fp4moe: FP4 Mixture-of-Experts layers on Hopper"};
  app.require_subcommand(1);
  fp4moe::cli::add_presets_command(app);
  fp4moe::cli::add_check_command(app);
  fp4moe::cli::add_inspect_command(app);
  fp4moe::cli::add_device_command(app);
  fp4moe::cli::add_bench_command(app);
  fp4moe::cli::add_prepack_command(app);
  fp4moe::cli::add_plan_command(app);
  if (argc < 2) return fail("a command is required; commands: " + command_list(app) +
                            " (`fp4moe <command> --help` lists its options)");
  const std::string first = argv[1];
  if (!first.empty() && first[0] != '-') {
    bool known = false;
    for (const CLI::App* c : app.get_subcommands({})) known = known || c->get_name() == first;
    if (!known) return fail("unknown command '" + first + "'; commands: " + command_list(app));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::RuntimeError& e) {
    return e.get_exit_code();  // a command's own status (a failed check: 2)
  } catch (const CLI::ParseError& e) {
    return fail(std::string(e.what()) + " (`fp4moe " +
                (first.empty() || first[0] == '-' ? std::string("<command>") : first) +
                " --help` lists the options)");
  } catch (const std::bad_alloc&) {
    return fail("out of host memory");
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  return 0;
}
