// stmuxd's metrics (daemon/metrics.cc): the text is well-formed Prometheus
// exposition format whatever a tenant calls itself, histograms are
// cumulative, and the file is replaced whole. The checker is
// tests/prometheus_format.h, written apart from the writer.
#include "daemon/metrics.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "prometheus_format.h"
#include "test_support.h"

namespace stmux::daemon {
namespace {

using testing::prometheusFault;
using testing::prometheusValue;

TEST(MetricsText, FamiliesSamplesAndHistogramsAreWellFormed) {
  MetricsText out;
  out.family("stmux_clients", "gauge", "Tenant processes attached.");
  out.sample("stmux_clients", {}, 3);
  out.family("stmux_client_requests_total", "counter", "Requests, per tenant.");
  out.sample("stmux_client_requests_total", {{"pid", "12"}, {"program", "python3"}}, 1e12);
  const double bounds[] = {1, 2, 4};
  const std::uint64_t counts[] = {5, 0, 2, 1};  // per bucket, the last above 4
  out.family("stmux_batch_size", "histogram", "Requests per batch.");
  out.histogram("stmux_batch_size", {{"gpu", "0"}}, bounds, counts, 3, 17);
  const std::string text = out.str();
  EXPECT_EQ(prometheusFault(text), "") << text;
  EXPECT_EQ(prometheusValue(text, "stmux_clients"), 3);
  EXPECT_EQ(prometheusValue(text, "stmux_client_requests_total", {"program=\"python3\""}), 1e12);
  // Cumulative: 5, 5, 7, 8.
  EXPECT_EQ(prometheusValue(text, "stmux_batch_size_bucket", {"le=\"1\""}), 5);
  EXPECT_EQ(prometheusValue(text, "stmux_batch_size_bucket", {"le=\"2\""}), 5);
  EXPECT_EQ(prometheusValue(text, "stmux_batch_size_bucket", {"le=\"4\""}), 7);
  EXPECT_EQ(prometheusValue(text, "stmux_batch_size_bucket", {"le=\"+Inf\""}), 8);
  EXPECT_EQ(prometheusValue(text, "stmux_batch_size_count"), 8);
  EXPECT_EQ(prometheusValue(text, "stmux_batch_size_sum"), 17);
}

// A tenant names its own program: quotes, backslashes and newlines in it must
// not break the format or forge a sample.
TEST(MetricsText, LabelValuesAreEscaped) {
  MetricsText out;
  out.family("stmux_clients_by_name", "gauge", "Help with a \\ and a\nnewline.");
  out.sample("stmux_clients_by_name", {{"program", "evil\"} 1\nstmux_forged 7\\"}}, 1);
  const std::string text = out.str();
  EXPECT_EQ(prometheusFault(text), "") << text;
  EXPECT_EQ(prometheusValue(text, "stmux_forged"), std::nullopt) << text;
  EXPECT_NE(text.find(R"(program="evil\"} 1\nstmux_forged 7\\")"), std::string::npos) << text;
}

// Cut to its field's 31 bytes inside a character, or sent as any bytes by a
// hostile tenant: a program name that is not UTF-8 would make Prometheus drop
// the whole file. Each bad byte becomes U+FFFD; good characters stay.
TEST(MetricsText, LabelValuesThatAreNotUtf8AreMadeSo) {
  MetricsText out;
  out.family("stmux_clients_by_name", "gauge", "Tenants.");
  const std::string cut = "caf\xC3";                        // "café" cut inside the é
  const std::string garbage = "\xFF\xC0\x80\xED\xA0\x80x";  // invalid, overlong, surrogate
  out.sample("stmux_clients_by_name", {{"program", cut}}, 1);
  out.sample("stmux_clients_by_name", {{"program", garbage}}, 2);
  out.sample("stmux_clients_by_name", {{"program", "caf\xC3\xA9 \xF0\x9F\x98\x80"}}, 3);
  const std::string text = out.str();
  EXPECT_EQ(prometheusFault(text), "") << text;
  EXPECT_NE(text.find("program=\"caf\xEF\xBF\xBD\""), std::string::npos) << text;
  EXPECT_NE(text.find("program=\"caf\xC3\xA9 \xF0\x9F\x98\x80\""), std::string::npos) << text;
}

TEST(MetricsText, TheCheckerCatchesWhatIsWrong) {
  EXPECT_NE(prometheusFault("# HELP a h\n# TYPE a gauge\na{b=\"\xC3\"} 1\n"), "");
  // The checker must be able to fail, or the tests above prove nothing.
  EXPECT_NE(prometheusFault("stmux_x 1\n"), "");  // no HELP/TYPE
  EXPECT_NE(prometheusFault("# HELP a h\n# TYPE a gauge\na{b=\"c} 1\n"), "");
  EXPECT_NE(prometheusFault("# HELP a h\n# TYPE a gauge\na one\n"), "");
  EXPECT_NE(prometheusFault("# HELP a h\n# TYPE a histogram\na_bucket{le=\"1\"} 3\n"
                            "a_bucket{le=\"+Inf\"} 2\na_sum 1\na_count 2\n"),
            "");
  EXPECT_NE(prometheusFault("# HELP a h\n# TYPE a histogram\na_bucket{le=\"+Inf\"} 2\n"
                            "a_sum 1\na_count 3\n"),
            "");
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(MetricsFile, EachTextReplacesTheFileWhole) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/stmuxd.prom";
  {
    MetricsFile file(path);
    file.publish("# HELP a h\n# TYPE a gauge\na 1\n");
    ASSERT_TRUE(
        testing::waitFor([&] { return slurp(path) == "# HELP a h\n# TYPE a gauge\na 1\n"; }));
    file.publish("# HELP a h\n# TYPE a gauge\na 2\n");
    ASSERT_TRUE(
        testing::waitFor([&] { return slurp(path) == "# HELP a h\n# TYPE a gauge\na 2\n"; }));
  }
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  EXPECT_EQ(std::filesystem::status(path).permissions() & std::filesystem::perms::others_read,
            std::filesystem::perms::others_read)
      << "node-exporter must be able to read it";
}

TEST(MetricsFile, AnUnwritablePlaceCostsNothingButAWarning) {
  MetricsFile file("/nonexistent-stmux-dir/stmuxd.prom");
  file.publish("# HELP a h\n# TYPE a gauge\na 1\n");
  file.publish("# HELP a h\n# TYPE a gauge\na 2\n");
  EXPECT_FALSE(std::filesystem::exists("/nonexistent-stmux-dir"));
}

}  // namespace
}  // namespace stmux::daemon
