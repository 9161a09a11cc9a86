// The PNG chart writer: every image is decoded here by a reader written
// independently of the encoder (bitwise CRC, byte-at-a-time Adler-32), so an
// encoder bug cannot hide behind a matching decoder bug; pixels are then
// checked for where each series may and may not appear.
#include "tools/plot.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace stmux::tools {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kMax = std::numeric_limits<double>::max();

constexpr std::uint32_t kRed = 0xFF0000;
constexpr std::uint32_t kBlue = 0x0000FF;
constexpr std::uint32_t kGreen = 0x00FF00;
constexpr std::uint32_t kWhite = 0xFFFFFF;
constexpr std::uint32_t kNoDataGrey = 0x808080;

std::uint32_t crcBitwise(const std::uint8_t* data, std::size_t n) {
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    c ^= data[i];
    for (int k = 0; k < 8; ++k) {
      c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
  }
  return ~c;
}

std::uint32_t adlerSlow(const std::vector<std::uint8_t>& data) {
  std::uint32_t a = 1, b = 0;
  for (const std::uint8_t byte : data) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

std::uint32_t be32(const std::vector<std::uint8_t>& v, std::size_t at) {
  return (std::uint32_t{v[at]} << 24) | (std::uint32_t{v[at + 1]} << 16) |
         (std::uint32_t{v[at + 2]} << 8) | std::uint32_t{v[at + 3]};
}

struct Image {
  std::uint32_t width = 0, height = 0;
  int blocks = 0;  // stored deflate blocks seen
  std::vector<std::uint8_t> rgb;

  // Out of range reads as a colour no test looks for, so a failed decode
  // fails assertions instead of crashing the binary.
  std::uint32_t at(std::uint32_t x, std::uint32_t y) const {
    if (x >= width || y >= height || rgb.size() != std::size_t{width} * height * 3) {
      return 0xFF000000u;
    }
    const std::size_t i = (static_cast<std::size_t>(y) * width + x) * 3;
    return (std::uint32_t{rgb[i]} << 16) | (std::uint32_t{rgb[i + 1]} << 8) | rgb[i + 2];
  }
  // Pixels of the colour in columns [x0, x1).
  std::size_t count(std::uint32_t colour, std::uint32_t x0 = 0,
                    std::uint32_t x1 = std::numeric_limits<std::uint32_t>::max()) const {
    std::size_t n = 0;
    for (std::uint32_t y = 0; y < height; ++y) {
      for (std::uint32_t x = x0; x < std::min(x1, width); ++x) {
        n += at(x, y) == colour;
      }
    }
    return n;
  }
};

// Decodes a PNG as the writer promises to make it: 8-bit RGB, no interlace,
// zlib of stored blocks only, filter 0 on every row. Fails the test otherwise.
void decode(const std::vector<std::uint8_t>& png, Image* image) {
  const std::uint8_t signature[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  ASSERT_GE(png.size(), 8u);
  ASSERT_EQ(0, std::memcmp(png.data(), signature, 8));

  std::vector<std::uint8_t> zlib;
  std::vector<std::string> types;
  std::size_t pos = 8;
  bool seen_end = false;
  while (pos < png.size()) {
    ASSERT_FALSE(seen_end) << "bytes after IEND";
    ASSERT_LE(pos + 12, png.size()) << "truncated chunk header at " << pos;
    const std::uint32_t length = be32(png, pos);
    ASSERT_LE(std::uint64_t{pos} + 12 + length, png.size()) << "chunk overruns the file";
    const std::string type(png.begin() + pos + 4, png.begin() + pos + 8);
    EXPECT_EQ(be32(png, pos + 8 + length), crcBitwise(&png[pos + 4], length + 4))
        << "CRC of chunk " << type;
    const auto data = png.begin() + pos + 8;
    if (type == "IHDR") {
      ASSERT_TRUE(types.empty()) << "IHDR must come first";
      ASSERT_EQ(length, 13u);
      image->width = be32(png, pos + 8);
      image->height = be32(png, pos + 12);
      EXPECT_EQ(data[8], 8) << "bit depth";
      EXPECT_EQ(data[9], 2) << "colour type";
      EXPECT_EQ(data[10], 0) << "compression";
      EXPECT_EQ(data[11], 0) << "filter method";
      EXPECT_EQ(data[12], 0) << "interlace";
    } else if (type == "IDAT") {
      zlib.insert(zlib.end(), data, data + length);
    } else if (type == "IEND") {
      EXPECT_EQ(length, 0u);
      seen_end = true;
    } else {
      ADD_FAILURE() << "unexpected chunk " << type;
    }
    types.push_back(type);
    pos += 12 + length;
  }
  ASSERT_TRUE(seen_end) << "no IEND";
  ASSERT_FALSE(types.empty());
  ASSERT_EQ(types.front(), "IHDR");

  ASSERT_GE(zlib.size(), 2u + 5u + 4u);
  EXPECT_EQ(zlib[0] & 0x0F, 8) << "CM must be deflate";
  EXPECT_LE(zlib[0] >> 4, 7) << "CINFO";
  EXPECT_EQ((zlib[0] * 256 + zlib[1]) % 31, 0) << "FCHECK";
  EXPECT_EQ(zlib[1] & 0x20, 0) << "FDICT";
  std::vector<std::uint8_t> raw;
  std::size_t z = 2;
  for (bool final = false; !final;) {
    ASSERT_LE(z + 5, zlib.size()) << "truncated block header";
    const std::uint8_t header = zlib[z];
    final = header & 1;
    ASSERT_EQ((header >> 1) & 3, 0) << "only stored blocks are expected";
    const std::uint32_t len = zlib[z + 1] | (zlib[z + 2] << 8);
    const std::uint32_t nlen = zlib[z + 3] | (zlib[z + 4] << 8);
    ASSERT_EQ(len ^ nlen, 0xFFFFu) << "NLEN is not the complement of LEN";
    z += 5;
    ASSERT_LE(z + len, zlib.size()) << "block overruns the stream";
    raw.insert(raw.end(), zlib.begin() + z, zlib.begin() + z + len);
    z += len;
    ++image->blocks;
  }
  ASSERT_EQ(z + 4, zlib.size()) << "the stream must end with Adler-32 right after the final block";
  EXPECT_EQ(be32(zlib, z), adlerSlow(raw));

  const std::size_t row = 1 + 3 * static_cast<std::size_t>(image->width);
  ASSERT_EQ(raw.size(), image->height * row);
  image->rgb.clear();
  for (std::uint32_t y = 0; y < image->height; ++y) {
    ASSERT_EQ(raw[y * row], 0) << "filter byte of row " << y;
    image->rgb.insert(image->rgb.end(), raw.begin() + y * row + 1, raw.begin() + (y + 1) * row);
  }
}

Image render(const std::vector<Chart>& charts, int width = 800, int height = 400) {
  Image image;
  const std::vector<std::uint8_t> png = renderPng(charts, width, height);
  decode(png, &image);
  if (::testing::Test::HasFatalFailure()) return Image{};
  EXPECT_EQ(image.width, static_cast<std::uint32_t>(width));
  EXPECT_EQ(image.height, static_cast<std::uint32_t>(height));
  return image;
}

// No label, so no legend: the colour appears only where the data is drawn.
Chart lineChart(std::uint32_t rgb, std::vector<std::pair<double, double>> points,
                std::string label = "") {
  Chart chart{"title", "x", "y", false, false, {}};
  chart.series.push_back({std::move(label), std::move(points), rgb});
  return chart;
}

TEST(PlotTest, DecoderSelfCheckAgainstKnownValues) {
  const std::uint8_t iend[] = {'I', 'E', 'N', 'D'};
  EXPECT_EQ(crcBitwise(iend, 4), 0xAE426082u);
  const std::string wiki = "Wikipedia";
  EXPECT_EQ(adlerSlow(std::vector<std::uint8_t>(wiki.begin(), wiki.end())), 0x11E60398u);
}

TEST(PlotTest, OutputIsAValidPngWithManyStoredBlocks) {
  const Image image = render({lineChart(kRed, {{1, 2}, {2, 4}, {3, 3}})}, 1400, 520);
  // 520 rows of 4201 bytes need 34 blocks of at most 65535 bytes.
  EXPECT_EQ(image.blocks, 34);
  EXPECT_EQ(image.rgb.size(), 1400u * 520u * 3u);
}

TEST(PlotTest, ImageSizesAtTheLimitsAreValid) {
  const Chart chart = lineChart(kRed, {{0, 0}, {1, 1}});
  render({chart}, kMinImageSide, kMinImageSide);
  render({chart}, kMaxImageSide, kMinImageSide);
  render({chart}, kMinImageSide, kMaxImageSide);
}

TEST(PlotTest, RedSeriesStaysInItsPanelAndCornersAreWhite) {
  const Image image = render(
      {lineChart(kRed, {{0, 0}, {5, 3}, {10, 10}}), lineChart(kBlue, {{0, 10}, {5, 7}, {10, 0}})});
  const std::uint32_t half = image.width / 2;
  EXPECT_GT(image.count(kRed, 0, half), 200u);
  EXPECT_EQ(image.count(kRed, half), 0u);
  EXPECT_GT(image.count(kBlue, half), 200u);
  EXPECT_EQ(image.count(kBlue, 0, half), 0u);
  for (const auto& [x, y] : {std::pair<std::uint32_t, std::uint32_t>{0, 0},
                             {image.width - 1, 0},
                             {0, image.height - 1},
                             {image.width - 1, image.height - 1},
                             {half, 0}}) {
    EXPECT_EQ(image.at(x, y), kWhite) << "at " << x << "," << y;
  }
}

TEST(PlotTest, PanelsHaveEqualWidths) {
  const Image image =
      render({lineChart(kRed, {{0, 0}, {1, 1}}), lineChart(kGreen, {{0, 0}, {1, 1}}),
              lineChart(kBlue, {{0, 0}, {1, 1}})},
             900, 300);
  EXPECT_GT(image.count(kRed, 0, 300), 0u);
  EXPECT_EQ(image.count(kRed, 300), 0u);
  EXPECT_GT(image.count(kGreen, 300, 600), 0u);
  EXPECT_EQ(image.count(kGreen, 0, 300) + image.count(kGreen, 600), 0u);
  EXPECT_GT(image.count(kBlue, 600), 0u);
  EXPECT_EQ(image.count(kBlue, 0, 600), 0u);
}

// Pixel rows and columns holding the colour: [min, max] of each.
struct Bounds {
  std::uint32_t x0 = UINT32_MAX, y0 = UINT32_MAX, x1 = 0, y1 = 0;
  std::uint32_t y_at_x0 = 0, y_at_x1 = 0;  // a row holding the colour in the outermost columns
};

Bounds bounds(const Image& image, std::uint32_t colour) {
  Bounds b;
  for (std::uint32_t x = 0; x < image.width; ++x) {
    for (std::uint32_t y = 0; y < image.height; ++y) {
      if (image.at(x, y) != colour) continue;
      if (x < b.x0) b.y_at_x0 = y;
      if (x >= b.x1) b.y_at_x1 = y;
      b.x0 = std::min(b.x0, x);
      b.x1 = std::max(b.x1, x);
      b.y0 = std::min(b.y0, y);
      b.y1 = std::max(b.y1, y);
    }
  }
  return b;
}

TEST(PlotTest, YGrowsUpwardsAndXToTheRight) {
  const Image image = render({lineChart(kRed, {{0, 0}, {10, 10}})});
  const Bounds b = bounds(image, kRed);
  ASSERT_LT(b.x0, b.x1);
  EXPECT_GT(b.y_at_x0, b.y_at_x1) << "the point at x=0, y=0 must be drawn below x=10, y=10";
  // The 5% padding keeps the line well inside the panel.
  EXPECT_GT(b.x1 - b.x0, image.width / 2);
  EXPECT_GT(b.y1 - b.y0, image.height / 2);
}

TEST(PlotTest, MarkersAreClippedToTheAxesBox) {
  // A short panel leaves the 5% padding thinner than half a marker.
  Chart chart{"", "", "", false, false, {{"", {{0, 0}, {1, 1}}, kRed}}};
  const Image image = render({chart}, 400, 64);
  // The box's top and bottom edges are the only rows mostly black.
  std::vector<std::uint32_t> edges;
  for (std::uint32_t y = 0; y < image.height; ++y) {
    std::uint32_t black = 0;
    for (std::uint32_t x = 0; x < image.width; ++x) {
      black += image.at(x, y) == 0;
    }
    if (black > image.width / 2) edges.push_back(y);
  }
  ASSERT_EQ(edges.size(), 2u);
  const Bounds b = bounds(image, kRed);
  ASSERT_GT(image.count(kRed), 0u);
  EXPECT_GT(b.y0, edges[0]);
  EXPECT_LT(b.y1, edges[1]);
}

TEST(PlotTest, SinglePointIsOneMarker) {
  const Image image = render({lineChart(kRed, {{3, 5}})});
  const Bounds b = bounds(image, kRed);
  EXPECT_EQ(b.x1 - b.x0 + 1, 6u);
  EXPECT_EQ(b.y1 - b.y0 + 1, 6u);
  EXPECT_EQ(image.count(kRed), 36u);
}

TEST(PlotTest, EqualYValuesDrawAFlatLine) {
  const Image image = render({lineChart(kRed, {{0, 7}, {1, 7}, {2, 7}})});
  const Bounds b = bounds(image, kRed);
  EXPECT_GT(b.x1 - b.x0, image.width / 2);
  EXPECT_EQ(b.y1 - b.y0 + 1, 6u) << "markers and line on one level";
}

TEST(PlotTest, PointsAreDrawnInXOrder) {
  const auto sorted = renderPng({lineChart(kRed, {{0, 1}, {1, 3}, {2, 2}, {3, 5}})}, 600, 300);
  const auto shuffled = renderPng({lineChart(kRed, {{2, 2}, {0, 1}, {3, 5}, {1, 3}})}, 600, 300);
  EXPECT_EQ(sorted, shuffled);
}

TEST(PlotTest, NonFiniteYBreaksTheLine) {
  const auto midColumnRed = [](const Image& image) {
    const Bounds b = bounds(image, kRed);
    const std::uint32_t mid = (b.x0 + b.x1) / 2;
    return image.count(kRed, mid, mid + 1);
  };
  const Image joined = render({lineChart(kRed, {{0, 1}, {2, 1}})});
  EXPECT_GT(midColumnRed(joined), 0u);
  for (const double bad : {kNaN, kInf, -kInf}) {
    const Image gap = render({lineChart(kRed, {{0, 1}, {1, bad}, {2, 1}})});
    EXPECT_EQ(midColumnRed(gap), 0u) << "y=" << bad;
    EXPECT_EQ(gap.count(kRed), 72u) << "two markers, no line";
  }
}

TEST(PlotTest, LabelledSeriesGetsALegendSwatchBelowTheAxes) {
  const Image plain = render({lineChart(kRed, {{0, 5}, {1, 5}})});
  const Image labelled = render({lineChart(kRed, {{0, 5}, {1, 5}}, "stmux")});
  const Bounds p = bounds(plain, kRed), l = bounds(labelled, kRed);
  EXPECT_GT(l.y1, p.y1 + 20) << "the swatch sits below the x axis labels";
  EXPECT_GT(labelled.count(kRed), plain.count(kRed));
}

TEST(PlotTest, ChartWithoutDataSaysSo) {
  for (const Chart& chart :
       {Chart{"empty", "x", "y", false, false, {}},
        Chart{"no points", "x", "y", false, false, {{"", {}, kRed}}},
        Chart{"all bad", "", "", false, false, {{"", {{kNaN, 1}, {1, kNaN}, {kInf, kInf}}, kRed}}},
        Chart{"log, non-positive", "", "", true, true, {{"", {{1, 0}, {-1, 5}, {0, -1}}, kRed}}}}) {
    const Image image = render({chart});
    EXPECT_GT(image.count(kNoDataGrey), 20u) << chart.title;
    EXPECT_EQ(image.count(kRed), 0u) << chart.title;
  }
  const Image blank = render({});
  EXPECT_EQ(blank.count(kWhite), std::size_t{blank.width} * blank.height);
}

TEST(PlotTest, LogAxesSkipNonPositiveValues) {
  const Image image = render(
      {Chart{"log", "", "", true, true, {{"", {{1, -5}, {2, 0}, {10, 10}, {100, 1000}}, kRed}}}});
  // Two drawable points: two markers joined by one line.
  EXPECT_GT(image.count(kRed), 72u);
  const Bounds b = bounds(image, kRed);
  EXPECT_GT(b.y_at_x0, b.y_at_x1);
}

TEST(PlotTest, HostileInputsStillMakeValidPngs) {
  const std::string long_label(100'000, 'W');
  const std::string odd_label = "tab\there\nnl \x01\x7f \xc2\xb5s \xe2\x82\xac \xff";
  std::vector<Chart> charts = {
      lineChart(kRed, {{-kMax, -kMax}, {kMax, kMax}, {0, 0}}),
      lineChart(kRed, {{1, 1}}),
      lineChart(kRed, {{5, 1}, {5, 2}, {5, 3}}),  // zero-width x range
      lineChart(kRed, {{4.9e-324, 4.9e-324}, {1e-320, 1e-320}}),
      lineChart(kRed, {{1e15, 1}, {1e15 + 1, 2}}),
      lineChart(kRed, {{0, kMax}, {1, kMax}}),
      Chart{long_label,
            long_label,
            long_label,
            true,
            true,
            {{long_label, {{1e-300, 1e300}, {1e300, 1e-300}}, 0xFFFFFFFFu}}},
      Chart{odd_label, odd_label, odd_label, false, true, {{odd_label, {{0, 1}, {1, 10}}, kBlue}}},
  };
  render(charts, 1400, 520);
  for (const Chart& chart : charts) {
    render({chart}, 1400, 520);
  }
  // More charts than the image has columns: most panels are empty.
  render(std::vector<Chart>(200, charts[0]), kMinImageSide, kMinImageSide);
  // Far more series than the legend has room for.
  Chart crowded{"crowded", "x", "y", false, false, {}};
  for (int i = 0; i < 300; ++i) {
    crowded.series.push_back({"series " + std::to_string(i), {{0, i}, {1, -i}}, kRed});
  }
  render({crowded}, 300, 200);
}

TEST(PlotTest, RandomChartsNeverBreakTheEncoder) {
  std::mt19937_64 rng(12345);
  const double specials[] = {0, -0.0, 1, -1, kNaN, kInf, -kInf, kMax, -kMax, 1e-310, 1e300};
  auto value = [&]() -> double {
    switch (rng() % 4) {
      case 0:
        return specials[rng() % std::size(specials)];
      case 1:
        return std::uniform_real_distribution<double>(-1e6, 1e6)(rng);
      case 2:
        return std::pow(10.0, std::uniform_real_distribution<double>(-300, 300)(rng));
      default:
        return static_cast<double>(rng() % 10);
    }
  };
  for (int iteration = 0; iteration < 60; ++iteration) {
    std::vector<Chart> charts(1 + rng() % 3);
    for (Chart& chart : charts) {
      chart.log_x = rng() % 2;
      chart.log_y = rng() % 2;
      chart.series.resize(rng() % 5);
      for (Series& s : chart.series) {
        s.rgb = static_cast<std::uint32_t>(rng());
        s.label = std::string(rng() % 30, 'a');
        s.points.resize(rng() % 12);
        for (auto& p : s.points) {
          p = {value(), value()};
        }
      }
    }
    const int width = kMinImageSide + static_cast<int>(rng() % 900);
    const int height = kMinImageSide + static_cast<int>(rng() % 500);
    SCOPED_TRACE(iteration);
    render(charts, width, height);
  }
}

TEST(PlotTest, SizeOutsideTheAcceptedRangeIsRefused) {
  EXPECT_TRUE(renderPng({}, 0, 0).empty());
  EXPECT_TRUE(renderPng({}, kMinImageSide - 1, 100).empty());
  EXPECT_TRUE(renderPng({}, 100, kMaxImageSide + 1).empty());
  const std::string path =
      (std::filesystem::temp_directory_path() / ("plot_test_size_" + std::to_string(::getpid())))
          .string();
  const Status status = writePng(path, {}, 10, 520);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("64..8192"), std::string::npos) << status.message();
  EXPECT_NE(status.message().find("10x520"), std::string::npos) << status.message();
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(PlotTest, WritesTheRenderedBytes) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("plot_test_" + std::to_string(::getpid()) + ".png"))
                               .string();
  const std::vector<Chart> charts = {lineChart(kRed, {{1, 2}, {3, 4}})};
  const Status status = writePng(path, charts, 640, 240);
  ASSERT_TRUE(status.ok()) << status.message();
  std::ifstream in(path, std::ios::binary);
  const std::vector<std::uint8_t> bytes{std::istreambuf_iterator<char>(in), {}};
  std::filesystem::remove(path);
  EXPECT_EQ(bytes, renderPng(charts, 640, 240));
}

TEST(PlotTest, UnwritablePathIsAnErrorNamingIt) {
  const std::string path = "/nonexistent-stmux-dir/plot.png";
  const Status status = writePng(path, {lineChart(kRed, {{1, 2}})});
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(path), std::string::npos) << status.message();
  EXPECT_NE(status.message().find(std::strerror(ENOENT)), std::string::npos) << status.message();

  const std::string dir = std::filesystem::temp_directory_path().string();
  const Status is_dir = writePng(dir, {});
  ASSERT_FALSE(is_dir.ok());
  EXPECT_NE(is_dir.message().find(dir), std::string::npos) << is_dir.message();
}

TEST(PlotTest, TickLabelsAreShort) {
  EXPECT_EQ(formatTickLabel(0, 1), "0");
  EXPECT_EQ(formatTickLabel(1, 1), "1");
  EXPECT_EQ(formatTickLabel(10, 10), "10");
  EXPECT_EQ(formatTickLabel(100, 100), "100");
  EXPECT_EQ(formatTickLabel(1000, 1000), "1k");
  EXPECT_EQ(formatTickLabel(10000, 10000), "10k");
  EXPECT_EQ(formatTickLabel(1e6, 1e6), "1M");
  EXPECT_EQ(formatTickLabel(2e9, 1e9), "2G");
  EXPECT_EQ(formatTickLabel(0.5, 0.5), "0.5");
  EXPECT_EQ(formatTickLabel(0.05, 0.05), "0.05");
  EXPECT_EQ(formatTickLabel(1500, 500), "1.5k");
  EXPECT_EQ(formatTickLabel(2000, 500), "2k");
  EXPECT_EQ(formatTickLabel(-2, 1), "-2");
  EXPECT_EQ(formatTickLabel(1.2, 0.2), "1.2");
  EXPECT_EQ(formatTickLabel(0.30000000000000004, 0.1), "0.3");
  EXPECT_EQ(formatTickLabel(1e-5, 1e-5), "1e-5");
  EXPECT_EQ(formatTickLabel(2.5e-7, 5e-8), "2.5e-7");
  EXPECT_EQ(formatTickLabel(1e18, 1e18), "1e18");
  EXPECT_EQ(formatTickLabel(-5e307, 5e307), "-5e307");
}

}  // namespace
}  // namespace stmux::tools
