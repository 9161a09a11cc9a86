// A checker of the Prometheus text exposition format (0.0.4), written from
// its specification for the tests, independently of daemon/metrics.cc: every
// line is a HELP, a TYPE or a sample; a family's HELP and TYPE come before
// its samples, and once; names and labels are well formed, label values
// properly escaped, values numbers; a histogram's buckets rise to le="+Inf",
// which equals its _count. Also reads sample values back for the tests.
#pragma once

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>

namespace stmux::testing {

// Whether `text` is UTF-8 (Prometheus's parser refuses a file that is not):
// each code point decoded, and refused where overlong, a surrogate or past
// U+10FFFF.
inline bool isUtf8(const std::string& text) {
  for (std::size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const int extra = lead < 0x80         ? 0
                      : (lead >> 5) == 6  ? 1
                      : (lead >> 4) == 14 ? 2
                      : (lead >> 3) == 30 ? 3
                                          : -1;
    if (extra < 0 || i + extra >= text.size() + (extra == 0 ? 1 : 0)) return false;
    unsigned long point = extra == 0 ? lead : lead & (0x3f >> extra);
    for (int k = 1; k <= extra; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next >> 6) != 2) return false;
      point = (point << 6) | (next & 0x3f);
    }
    static const unsigned long kLeast[] = {0, 0x80, 0x800, 0x10000};
    if (point < kLeast[extra] || point > 0x10ffff || (point >= 0xd800 && point <= 0xdfff)) {
      return false;
    }
    i += static_cast<std::size_t>(extra) + 1;
  }
  return true;
}

// Empty when `text` is well formed; else the first fault and its line.
inline std::string prometheusFault(const std::string& text) {
  if (!isUtf8(text)) return "the text is not UTF-8";
  static const std::regex help(R"(^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$)");
  static const std::regex type(
      R"(^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$)");
  static const std::regex sample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$)");
  static const std::regex label(R"(^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)\"(,|$))");
  std::set<std::string> families;
  std::string family, family_type;
  bool typed = false;
  // Per histogram series (its labels but le): the last bucket seen.
  std::map<std::string, std::pair<double, double>> buckets;  // series -> (le, count)
  std::map<std::string, double> infinity_counts;
  std::istringstream lines(text);
  int number = 0;
  for (std::string line; std::getline(lines, line);) {
    ++number;
    auto fault = [&](const std::string& why) {
      return "line " + std::to_string(number) + ": " + why + ": " + line;
    };
    std::smatch m;
    if (line.rfind("# HELP ", 0) == 0) {
      if (!std::regex_match(line, m, help)) return fault("malformed HELP");
      if (!families.insert(m[1]).second) return fault("a second HELP for the family");
      family = m[1];
      typed = false;
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      if (!std::regex_match(line, m, type)) return fault("malformed TYPE");
      if (m[1] != family || typed) return fault("TYPE not right after its family's HELP");
      family_type = m[2];
      typed = true;
      continue;
    }
    if (!std::regex_match(line, m, sample)) return fault("not a sample");
    if (!typed) return fault("a sample before its family's TYPE");
    const std::string name = m[1];
    const bool histogram = family_type == "histogram";
    const std::string suffix = name.size() > family.size() ? name.substr(family.size()) : "";
    if (histogram ? (name.rfind(family, 0) != 0 ||
                     (suffix != "_bucket" && suffix != "_sum" && suffix != "_count"))
                  : name != family) {
      return fault("a sample of another family than " + family);
    }
    std::string labels = m[3], series, le;
    while (!labels.empty()) {
      std::smatch l;
      if (!std::regex_search(labels, l, label)) return fault("malformed labels");
      if (l[1] == "le") {
        le = l[2];
      } else {
        series += std::string(l[1]) + "=" + std::string(l[2]) + ";";
      }
      labels = l.suffix();
    }
    const std::string value_text = m[4];
    double value = 0;
    if (value_text == "+Inf" || value_text == "-Inf" || value_text == "NaN") {
      value = value_text == "NaN" ? NAN : (value_text[0] == '+' ? INFINITY : -INFINITY);
    } else {
      char* end = nullptr;
      value = std::strtod(value_text.c_str(), &end);
      if (end == value_text.c_str() || *end != '\0') return fault("the value is not a number");
    }
    if (histogram && suffix == "_bucket") {
      if (le.empty()) return fault("a bucket without le");
      const double bound = le == "+Inf" ? INFINITY : std::strtod(le.c_str(), nullptr);
      auto [it, first] = buckets.try_emplace(family + series, bound, value);
      if (!first && (bound <= it->second.first || value < it->second.second)) {
        return fault("buckets must rise in le and in count");
      }
      it->second = {bound, value};
      if (std::isinf(bound)) infinity_counts[family + series] = value;
    }
    if (histogram && suffix == "_count") {
      auto it = infinity_counts.find(family + series);
      if (it == infinity_counts.end()) return fault("a _count before its le=\"+Inf\" bucket");
      if (it->second != value) return fault("_count differs from the +Inf bucket");
    }
  }
  return "";
}

// The value of the sample named `name` whose labels include every one of
// `with` ("key=\"value\"" texts), or nothing.
inline std::optional<double> prometheusValue(const std::string& text, const std::string& name,
                                             const std::vector<std::string>& with = {}) {
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(name, 0) != 0 || line[0] == '#') continue;
    const char next = line.size() > name.size() ? line[name.size()] : '\0';
    if (next != '{' && next != ' ') continue;
    bool all = true;
    for (const std::string& label : with)
      all = all && line.find(label) != std::string::npos;
    if (all) return std::strtod(line.c_str() + line.rfind(' ') + 1, nullptr);
  }
  return std::nullopt;
}

}  // namespace stmux::testing
