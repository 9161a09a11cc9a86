// The configuration table: every variable's valid and invalid values, driven
// by the table itself so that a new variable is covered the day it is added.
#include "stmux/config.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace stmux {
namespace {

Lookup mapLookup(std::map<std::string, std::string> values) {
  return [values = std::move(values)](std::string_view name) -> std::optional<std::string> {
    auto it = values.find(std::string(name));
    if (it == values.end()) return std::nullopt;
    return it->second;
  };
}

struct Samples {
  std::vector<std::string> valid;
  std::vector<std::string> invalid;
};

// Values every variable of a kind must accept and refuse, at its own bounds.
Samples samplesFor(const VarInfo& var) {
  auto str = [](std::int64_t v) { return std::to_string(v); };
  switch (var.kind) {
    case Kind::kBool:
      return {{"0", "1", "true", "false", "yes", "no", "on", "off", "TRUE", "Off"},
              {"", "2", "maybe", " 1", "1 ", "-1"}};
    case Kind::kInt:
      return {{str(var.min), str(var.max), str(var.min + (var.max - var.min) / 2)},
              {str(var.min - 1), str(var.max + 1), "", "abc", "1.5", "10x", " 5", "+",
               "99999999999999999999999"}};
    case Kind::kPow2:
      return {{str(var.min), str(var.max), str(var.min * 2)},
              {str(var.min / 2), str(var.max * 2), str(var.min + 1), str(var.max - 1), "", "x"}};
    case Kind::kPath:
      return {{"/tmp/stmux.sock", "/" + std::string(var.max - 1, 'p')},
              {"", "relative.sock", "./stmux.sock", "/" + std::string(var.max, 'p')}};
    case Kind::kLog:
      return {{"off", "error", "warn", "info", "debug", "trace", "warn,sched=debug",
               "info,shim=trace,exec=off", "stats=info"},
              {"", "loud", "info,gpu=debug", "info,sched=", "sched=debug,info", "info,,exec=info",
               "INFO"}};
    case Kind::kDevices:
      return {{"all", "0", "0,1", "3,GPU-12345678-1234-1234-1234-123456789abc"},
              {"", "gpu0", "0,0", "-1", "0,,1", "GPU-1234", "all,0", "0,"}};
    case Kind::kFileOrOff:
      return {{"off", "/run/stmux/stmuxd.prom", "/" + std::string(var.max - 1, 'p')},
              {"", "Off", "relative.prom", "/run/stmux/", "/" + std::string(var.max, 'p')}};
    case Kind::kUser:
      return {{"stmux", "_svc", "svc-stmux", "a.b", "Stmux2", std::string(kMaxUserName, 'u'),
               str(var.min), str(var.max), "998"},
              {"", str(var.max + 1), "99999999999999999999999", "-1", "stmux ", " stmux", "a:b",
               "1abc", ".hidden", "-stmux", "st\xc3\xa9mux", std::string(kMaxUserName + 1, 'u')}};
    case Kind::kChoice: {
      Samples samples{{}, {"", "nope"}};
      std::string_view choices = var.unit;
      while (true) {
        const std::size_t bar = choices.find('|');
        samples.valid.emplace_back(choices.substr(0, bar));
        if (bar == std::string_view::npos) break;
        choices.remove_prefix(bar + 1);
      }
      return samples;
    }
  }
  return {};
}

TEST(Config, DefaultsParseAndMatchTheTable) {
  auto config = parseConfig(mapLookup({}), Scope::kBoth);
  ASSERT_TRUE(config.ok()) << config.message();
  for (const VarInfo& var : kVars) {
    EXPECT_EQ(formatValue(config.value(), var.member), var.default_text) << var.name;
  }
  // The table's defaults are the values the code gets: a few, written here
  // apart from the table, as README.md and the units state them.
  EXPECT_EQ(config->socket, "/run/stmux/stmuxd.sock");
  EXPECT_EQ(config->window_us, 20);
  EXPECT_EQ(config->max_batch, 256);
  EXPECT_EQ(config->mode, "host");
  EXPECT_EQ(config->daemon_user, "stmux");
}

TEST(Config, EveryVariableAcceptsItsValidValues) {
  for (const VarInfo& var : kVars) {
    for (const std::string& value : samplesFor(var).valid) {
      auto config = parseConfig(mapLookup({{std::string(var.name), value}}), Scope::kBoth);
      ASSERT_TRUE(config.ok()) << var.name << "='" << value << "': " << config.message();
      // What was set is what is read back: parse the formatted value again.
      const std::string formatted = formatValue(config.value(), var.member);
      auto again = parseConfig(mapLookup({{std::string(var.name), formatted}}), Scope::kBoth);
      ASSERT_TRUE(again.ok()) << var.name << "='" << formatted << "': " << again.message();
      EXPECT_EQ(formatValue(again.value(), var.member), formatted) << var.name;
    }
  }
}

TEST(Config, EveryVariableRefusesInvalidValuesByName) {
  for (const VarInfo& var : kVars) {
    for (const std::string& value : samplesFor(var).invalid) {
      auto config = parseConfig(mapLookup({{std::string(var.name), value}}), Scope::kBoth);
      ASSERT_FALSE(config.ok()) << var.name << "='" << value << "' was accepted";
      const std::string& message = config.message();
      EXPECT_NE(message.find(std::string(var.name) + "='" + value + "'"), std::string::npos)
          << message;
      EXPECT_NE(message.find("accepted"), std::string::npos) << message;
    }
  }
}

TEST(Config, IntegerValuesAreExact) {
  auto config =
      parseConfig(mapLookup({{"STMUX_WINDOW_US", "250"}, {"STMUX_SLOTS", "1024"}}), Scope::kDaemon);
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->window_us, 250);
  EXPECT_EQ(config->slots, 1024);
}

TEST(Config, ErrorsListEveryBadVariable) {
  auto config = parseConfig(
      mapLookup({{"STMUX_WINDOW_US", "-5"}, {"STMUX_MAX_BATCH", "0"}, {"STMUX_LOG", "x"}}),
      Scope::kBoth);
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.message().find("STMUX_WINDOW_US='-5' is out of range"), std::string::npos);
  EXPECT_NE(config.message().find("STMUX_MAX_BATCH='0' is out of range"), std::string::npos);
  EXPECT_NE(config.message().find("STMUX_LOG='x'"), std::string::npos);
}

TEST(Config, EachValidVariableCountsEvenWhenAnotherIsInvalid) {
  std::string errors;
  const Config config = parseEachVariable(
      mapLookup({{"STMUX_TIMEOUT_MS", "0"}, {"STMUX_LOG", "info"}, {"STMUX_SPIN_US", "7"}}),
      Scope::kShim, errors);
  EXPECT_NE(errors.find("STMUX_TIMEOUT_MS='0' is out of range"), std::string::npos) << errors;
  EXPECT_EQ(config.timeout_ms, 10000) << "an invalid value must not be used";
  EXPECT_EQ(config.spin_us, 7);
  EXPECT_EQ(config.log, LogSpec::uniform(Level::kInfo));
}

TEST(Config, ScopeLeavesTheOtherSidesVariablesAlone) {
  // A daemon-only variable, invalid, in a tenant's environment: the shim
  // must still parse (it would otherwise lose interception over a setting it
  // never reads).
  auto shim = parseConfig(mapLookup({{"STMUX_WINDOW_US", "soon"}}), Scope::kShim);
  ASSERT_TRUE(shim.ok()) << shim.message();
  auto daemon = parseConfig(mapLookup({{"STMUX_WINDOW_US", "soon"}}), Scope::kDaemon);
  EXPECT_FALSE(daemon.ok());
  auto shared = parseConfig(mapLookup({{"STMUX_SOCKET", ""}}), Scope::kShim);
  EXPECT_FALSE(shared.ok());
}

TEST(Config, DaemonUserIsANameOrAUidAndOnlyTheShimReadsIt) {
  auto by_default = parseConfig(mapLookup({}), Scope::kShim);
  ASSERT_TRUE(by_default.ok()) << by_default.message();
  EXPECT_EQ(by_default->daemon_user, "stmux");
  auto by_uid = parseConfig(mapLookup({{"STMUX_DAEMON_USER", "998"}}), Scope::kShim);
  ASSERT_TRUE(by_uid.ok()) << by_uid.message();
  EXPECT_EQ(by_uid->daemon_user, "998");
  for (auto [value, why] : {std::pair{"", "is empty"},
                            {"4294967295", "is out of range"},
                            {"stmux daemon", "is neither a user name nor a uid"},
                            {"-1", "is neither a user name nor a uid"}}) {
    auto config = parseConfig(mapLookup({{"STMUX_DAEMON_USER", value}}), Scope::kShim);
    ASSERT_FALSE(config.ok()) << value;
    EXPECT_NE(config.message().find(fmt::format("STMUX_DAEMON_USER='{}' {}", value, why)),
              std::string::npos)
        << config.message();
    EXPECT_NE(config.message().find("accepted: a user name"), std::string::npos)
        << config.message();
  }
  // The daemon never reads it: a bad value there is not the daemon's error.
  EXPECT_TRUE(parseConfig(mapLookup({{"STMUX_DAEMON_USER", ""}}), Scope::kDaemon).ok());
}

TEST(Config, DevicesParseToAList) {
  auto config = parseConfig(
      mapLookup({{"STMUX_DEVICES", "1,GPU-12345678-1234-1234-1234-123456789abc"}}), Scope::kDaemon);
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->devices,
            (std::vector<std::string>{"1", "GPU-12345678-1234-1234-1234-123456789abc"}));
  auto all = parseConfig(mapLookup({}), Scope::kDaemon);
  EXPECT_TRUE(all->devices.empty());
}

TEST(Config, LogSpecSetsSubsystemsApart) {
  auto spec = parseLogSpec("warn,sched=debug,shim=off");
  ASSERT_TRUE(spec.ok()) << spec.message();
  EXPECT_EQ(spec->levels[static_cast<std::size_t>(Subsys::kSched)], Level::kDebug);
  EXPECT_EQ(spec->levels[static_cast<std::size_t>(Subsys::kShim)], Level::kOff);
  EXPECT_EQ(spec->levels[static_cast<std::size_t>(Subsys::kExec)], Level::kWarn);
}

TEST(Config, UnknownVariablesAreNamed) {
  std::string a = "STMUX_WINDOWS_US=5", b = "STMUX_LOG=info", c = "PATH=/bin", d = "STMUX_",
              e = "STMUX_BUILD_DIR=build-gpu";  // the scripts' own: not a typo
  char* env[] = {a.data(), b.data(), c.data(), d.data(), e.data(), nullptr};
  EXPECT_EQ(unknownVariables(env), (std::vector<std::string>{"STMUX_WINDOWS_US", "STMUX_"}));
}

TEST(Config, FlagNamesMirrorVariables) {
  EXPECT_EQ(flagName("STMUX_WINDOW_US"), "window-us");
  EXPECT_EQ(flagName("STMUX_MAX_BATCH"), "max-batch");
  // Every flag maps back to exactly one variable.
  for (const VarInfo& var : kVars) {
    int matches = 0;
    for (const VarInfo& other : kVars)
      matches += flagName(other.name) == flagName(var.name);
    EXPECT_EQ(matches, 1) << var.name;
  }
}

}  // namespace
}  // namespace stmux
