// Preloaded into a program by stmuxd_test: as each process image starts,
// before any library's own initialisers could read the environment, appends
// the value of $ENV_PROBE_NAME (or "unset") as a line to $ENV_PROBE_FILE.
#include <cstdio>
#include <cstdlib>

namespace {

__attribute__((constructor(101))) void probe() {
  const char* name = std::getenv("ENV_PROBE_NAME");
  const char* file = std::getenv("ENV_PROBE_FILE");
  if (name == nullptr || file == nullptr) return;
  if (std::FILE* out = std::fopen(file, "a")) {
    const char* value = std::getenv(name);
    std::fprintf(out, "%s\n", value != nullptr ? value : "unset");
    std::fclose(out);
  }
}

}  // namespace
