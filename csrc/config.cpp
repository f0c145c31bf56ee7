// The settings table of config.h. Values live in atomics (read on every op call, lock-free); an
// explicit set() wins over the environment variable, set("") returns to it.
#include "config.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

#ifdef MOE_WITH_SM90_GEMM
#include "cuda/sm90/grouped_gemm_sm90.h"
#endif

namespace moe::config {

namespace {

constexpr int kUnset = -2;  // no explicit value: use the environment variable

struct Setting {
  const char* name;
  const char* env;
  std::vector<std::string> words;  // value i <-> words[i] ("auto" may be -1 for integer settings)
  bool integer;                    // sm90 config ids: "auto" or an id in [0, count)
  bool wgrad;
  std::atomic<int> value{kUnset};
};

Setting g_settings[] = {
    {"cpu_gemm", "MOE_CPU_GEMM", {"auto", "aten"}, false, false},
    {"cuda_gemm", "MOE_CUDA_GEMM", {"auto", "native", "torch", "stream"}, false, false},
    {"sm90_forward_config", "MOE_SM90_GEMM_CONFIG", {}, true, false},
    {"sm90_wgrad_config", "MOE_SM90_WGRAD_CONFIG", {}, true, true},
    {"sm90_gathered", "MOE_SM90_GATHERED", {"auto", "fused", "unfused"}, false, false},
};

int sm90_count(bool wgrad) {
#ifdef MOE_WITH_SM90_GEMM
  return cuda::sm90::num_configs(wgrad);
#else
  (void)wgrad;
  return 0;
#endif
}

std::string allowed(const Setting& s) {
  if (s.integer) return "\"auto\" or a configuration id in [0, " + std::to_string(sm90_count(s.wgrad)) + ")";
  std::string out;
  for (const auto& w : s.words) out += (out.empty() ? "\"" : ", \"") + w + "\"";
  return out;
}

// Parses value ("" = the default); origin names where it came from, for the error.
int parse(const Setting& s, const std::string& value, const std::string& origin) {
  if (value.empty() || value == "auto") return s.integer ? -1 : 0;
  if (s.integer) {
    char* end = nullptr;
    const long id = std::strtol(value.c_str(), &end, 10);
    if (end != value.c_str() && *end == '\0' && id >= 0 && id < sm90_count(s.wgrad)) return int(id);
  } else {
    for (size_t i = 0; i < s.words.size(); ++i)
      if (value == s.words[i]) return int(i);
  }
  TORCH_CHECK(false, origin, " must be ", allowed(s), ", got '", value, "'");
}

Setting& find(const std::string& name) {
  for (auto& s : g_settings)
    if (name == s.name) return s;
  std::string known;
  for (const auto& s : g_settings) known += std::string(known.empty() ? "" : ", ") + s.name;
  TORCH_CHECK(false, "moe config: unknown setting \"", name, "\" (known: ", known, ")");
}

int read(Setting& s) {
  const int v = s.value.load(std::memory_order_relaxed);
  if (v != kUnset) return v;
  const char* env = std::getenv(s.env);
  return parse(s, env ? env : "", s.env);  // not cached: an invalid variable raises at every use
}

}  // namespace

CpuGemm cpu_gemm() { return CpuGemm(read(g_settings[0])); }
CudaGemm cuda_gemm() { return CudaGemm(read(g_settings[1])); }
int sm90_config(bool wgrad) { return read(g_settings[wgrad ? 3 : 2]); }
Sm90Gathered sm90_gathered() { return Sm90Gathered(read(g_settings[4])); }

std::vector<std::string> names() {
  std::vector<std::string> out;
  for (const auto& s : g_settings) out.emplace_back(s.name);
  return out;
}

std::string get(const std::string& name) {
  auto& s = find(name);
  const int v = read(s);
  if (s.integer) return v < 0 ? "auto" : std::to_string(v);
  return s.words[size_t(v)];
}

bool is_set(const std::string& name) { return find(name).value.load(std::memory_order_relaxed) != kUnset; }

void set(const std::string& name, const std::string& value) {
  auto& s = find(name);
  s.value.store(value.empty() ? kUnset : parse(s, value, std::string("moe.ops.config.") + s.name),
                std::memory_order_relaxed);
}

}  // namespace moe::config
