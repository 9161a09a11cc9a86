// The chart rasterizer and the PNG encoder behind tools/plot.h.
//
// Everything is drawn through one Canvas whose every write is checked against
// a clip rectangle inside the image, so no input (NaN, 1e308, a label of a
// million characters, a panel narrower than a glyph) can write outside the
// buffer; the worst it can do is draw nothing.
#include "tools/plot.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string_view>

#include "stmux/sys.h"

namespace stmux::tools {
namespace {

// ---------------------------------------------------------------------------
// Font: 5x7 glyphs in an 8-row cell, the last row for descenders (g j p q y).
// Row r of a glyph is one byte; bit 4 is the leftmost column.

constexpr int kGlyphW = 5;
constexpr int kGlyphH = 8;
constexpr int kAdvance = 6;  // one blank column between glyphs

constexpr std::uint8_t kFont[95][kGlyphH] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // space
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00},  // !
    {0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // "
    {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00},  // #
    {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04, 0x00},  // $
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00},  // %
    {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D, 0x00},  // &
    {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00},  // '
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00},  // (
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00},  // )
    {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00},  // *
    {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00},  // +
    {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08, 0x00},  // ,
    {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00},  // -
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00},  // .
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00},  // /
    {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00},  // 0
    {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00},  // 1
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00},  // 2
    {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00},  // 3
    {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00},  // 4
    {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00},  // 5
    {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00},  // 6
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00},  // 7
    {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00},  // 8
    {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00},  // 9
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00},  // :
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08, 0x00},  // ;
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00},  // <
    {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00},  // =
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00},  // >
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00},  // ?
    {0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E, 0x00},  // @
    {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00},  // A
    {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00},  // B
    {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00},  // C
    {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00},  // D
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00},  // E
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00},  // F
    {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00},  // G
    {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00},  // H
    {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00},  // I
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00},  // J
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00},  // K
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00},  // L
    {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00},  // M
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00},  // N
    {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00},  // O
    {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00},  // P
    {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00},  // Q
    {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00},  // R
    {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00},  // S
    {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00},  // T
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00},  // U
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00},  // V
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00},  // W
    {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00},  // X
    {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x00},  // Y
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00},  // Z
    {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00},  // [
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00},  // backslash
    {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00},  // ]
    {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00},  // ^
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00},  // _
    {0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00},  // `
    {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00},  // a
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E, 0x00},  // b
    {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00},  // c
    {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F, 0x00},  // d
    {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00},  // e
    {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00},  // f
    {0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // g
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00},  // h
    {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00},  // i
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x12, 0x0C},  // j
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00},  // k
    {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00},  // l
    {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11, 0x00},  // m
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00},  // n
    {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00},  // o
    {0x00, 0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10},  // p
    {0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01},  // q
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00},  // r
    {0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E, 0x00},  // s
    {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00},  // t
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00},  // u
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00},  // v
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00},  // w
    {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00},  // x
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // y
    {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00},  // z
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00},  // {
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00},  // |
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00},  // }
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00},  // ~
};

// Labels may carry UTF-8 ("latency (µs)"); the font is ASCII, so each code
// point becomes one glyph: micro signs read as 'u', anything else as '?'.
std::string toGlyphs(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 32 && c <= 126) {
      out.push_back(static_cast<char>(c));
    } else if (c == '\t' || c == '\n' || c == '\r') {
      out.push_back(' ');
    } else if (c >= 0xC0) {  // a lead byte; control and continuation bytes take no room
      const auto next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0;
      const bool micro = (c == 0xC2 && next == 0xB5) || (c == 0xCE && next == 0xBC);
      out.push_back(micro ? 'u' : '?');
    }
  }
  return out;
}

long long textWidth(std::string_view glyphs, int scale) {
  if (glyphs.empty()) return 0;
  return static_cast<long long>(glyphs.size()) * kAdvance * scale - scale;
}

// Shortens glyphs to fit max_width, marking the cut with "..".
std::string fitText(std::string glyphs, long long max_width, int scale) {
  if (textWidth(glyphs, scale) <= max_width) return glyphs;
  const long long fit = (max_width + scale) / (kAdvance * scale);
  if (fit < 3) return {};
  glyphs.resize(static_cast<std::size_t>(fit - 2));
  return glyphs + "..";
}

// ---------------------------------------------------------------------------
// Canvas

constexpr std::uint32_t kBlack = 0x000000;
constexpr std::uint32_t kGrid = 0xE0E0E0;
constexpr std::uint32_t kFrame = 0x999999;
constexpr std::uint32_t kMuted = 0x808080;

// Half-open: [x0, x1) x [y0, y1).
struct Rect {
  long long x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  bool empty() const { return x1 <= x0 || y1 <= y0; }
  long long width() const { return x1 - x0; }
  long long height() const { return y1 - y0; }
  Rect intersect(const Rect& o) const {
    return {std::max(x0, o.x0), std::max(y0, o.y0), std::min(x1, o.x1), std::min(y1, o.y1)};
  }
};

// Clips the segment to [x0, x1] x [y0, y1] (Liang-Barsky); false when none of
// it is inside.
bool clipSegment(double& ax, double& ay, double& bx, double& by, const Rect& r) {
  const double dx = bx - ax, dy = by - ay;
  if (!std::isfinite(dx) || !std::isfinite(dy)) return false;
  const double p[4] = {-dx, dx, -dy, dy};
  const double q[4] = {ax - static_cast<double>(r.x0), static_cast<double>(r.x1) - ax,
                       ay - static_cast<double>(r.y0), static_cast<double>(r.y1) - ay};
  double t0 = 0, t1 = 1;
  for (int i = 0; i < 4; ++i) {
    if (p[i] == 0) {
      if (q[i] < 0) return false;
      continue;
    }
    const double t = q[i] / p[i];
    if (p[i] < 0) {
      if (t > t1) return false;
      t0 = std::max(t0, t);
    } else {
      if (t < t0) return false;
      t1 = std::min(t1, t);
    }
  }
  const double nax = ax + t0 * dx, nay = ay + t0 * dy;
  bx = ax + t1 * dx;
  by = ay + t1 * dy;
  ax = nax;
  ay = nay;
  return true;
}

class Canvas {
 public:
  Canvas(int width, int height)
      : width_(width),
        height_(height),
        pixels_(static_cast<std::size_t>(width) * static_cast<std::size_t>(height) * 3,
                0xFF),  // white
        clip_{0, 0, width, height} {}

  int width() const { return width_; }
  int height() const { return height_; }
  const std::vector<std::uint8_t>& pixels() const { return pixels_; }

  // Everything drawn afterwards stays inside r and inside the image.
  void setClip(const Rect& r) { clip_ = r.intersect({0, 0, width_, height_}); }
  const Rect& clip() const { return clip_; }

  void fillRect(long long x, long long y, long long w, long long h, std::uint32_t rgb) {
    const Rect r = Rect{x, y, x + w, y + h}.intersect(clip_);
    if (r.empty()) return;
    for (long long py = r.y0; py < r.y1; ++py) {
      std::uint8_t* p = &pixels_[(static_cast<std::size_t>(py) * width_ + r.x0) * 3];
      for (long long px = r.x0; px < r.x1; ++px) {
        *p++ = static_cast<std::uint8_t>(rgb >> 16);
        *p++ = static_cast<std::uint8_t>(rgb >> 8);
        *p++ = static_cast<std::uint8_t>(rgb);
      }
    }
  }

  void hline(long long x0, long long x1, long long y, std::uint32_t rgb) {
    fillRect(x0, y, x1 - x0 + 1, 1, rgb);
  }
  void vline(long long x, long long y0, long long y1, std::uint32_t rgb) {
    fillRect(x, y0, 1, y1 - y0 + 1, rgb);
  }
  void frame(const Rect& r, std::uint32_t rgb) {
    hline(r.x0, r.x1 - 1, r.y0, rgb);
    hline(r.x0, r.x1 - 1, r.y1 - 1, rgb);
    vline(r.x0, r.y0, r.y1 - 1, rgb);
    vline(r.x1 - 1, r.y0, r.y1 - 1, rgb);
  }

  // A line with a square brush of side thickness, starting at the pixel the
  // endpoint rounds to and growing right and down.
  void line(double ax, double ay, double bx, double by, int thickness, std::uint32_t rgb) {
    if (!std::isfinite(ax) || !std::isfinite(ay) || !std::isfinite(bx) || !std::isfinite(by)) {
      return;
    }
    // Clip first, so the walk below is never longer than the clip rectangle.
    const Rect grown{clip_.x0 - thickness, clip_.y0 - thickness, clip_.x1 + thickness,
                     clip_.y1 + thickness};
    if (clip_.empty() || !clipSegment(ax, ay, bx, by, grown)) return;
    long long x = std::llround(ax), y = std::llround(ay);
    const long long ex = std::llround(bx), ey = std::llround(by);
    const long long dx = std::llabs(ex - x), dy = -std::llabs(ey - y);
    const long long sx = x < ex ? 1 : -1, sy = y < ey ? 1 : -1;
    long long err = dx + dy;
    for (;;) {
      fillRect(x, y, thickness, thickness, rgb);
      if (x == ex && y == ey) break;
      const long long e2 = 2 * err;
      if (e2 >= dy) {
        err += dy;
        x += sx;
      }
      if (e2 <= dx) {
        err += dx;
        y += sy;
      }
    }
  }

  // glyphs is ASCII from toGlyphs(); (x, y) is the top-left of the first cell.
  void text(long long x, long long y, std::string_view glyphs, int scale, std::uint32_t rgb) {
    if (y >= clip_.y1 || y + kGlyphH * scale <= clip_.y0) return;
    for (const char ch : glyphs) {
      if (x >= clip_.x1) break;
      auto c = static_cast<unsigned char>(ch);
      if (c < 32 || c > 126) c = '?';
      if (x + kGlyphW * scale > clip_.x0) {
        const std::uint8_t* rows = kFont[c - 32];
        for (int r = 0; r < kGlyphH; ++r) {
          for (int col = 0; col < kGlyphW; ++col) {
            if (rows[r] & (0x10 >> col)) {
              fillRect(x + col * scale, y + r * scale, scale, scale, rgb);
            }
          }
        }
      }
      x += kAdvance * scale;
    }
  }

 private:
  int width_;
  int height_;
  std::vector<std::uint8_t> pixels_;  // RGB, row-major, top row first
  Rect clip_;
};

// ---------------------------------------------------------------------------
// Axes and ticks

// An axis in axis space: the value itself, or its log10 on a log axis.
struct Axis {
  bool log = false;
  double lo = 0, hi = 1;
  // Halves before subtracting: lo and hi may be -1e308 and 1e308.
  double fraction(double v) const { return (v * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5); }
};

std::optional<double> toAxis(double v, bool log) {
  if (!std::isfinite(v)) return std::nullopt;
  if (!log) return v;
  if (v <= 0) return std::nullopt;
  return std::log10(v);
}

double clampFinite(double v) {
  constexpr double kMax = std::numeric_limits<double>::max();
  return std::clamp(v, -kMax, kMax);
}

Axis fitAxis(const std::vector<double>& values, bool log) {
  Axis a;
  a.log = log;
  if (values.empty()) return a;
  const auto [lo_it, hi_it] = std::minmax_element(values.begin(), values.end());
  double lo = *lo_it, hi = *hi_it;
  const double magnitude = std::max(std::fabs(lo), std::fabs(hi));
  if (hi - lo <= magnitude * 1e-12) {
    // One value (or equal ones): give it a band to sit in the middle of.
    const double pad = log ? 0.5 : (magnitude > 0 ? magnitude * 0.1 : 1.0);
    lo -= pad;
    hi += pad;
  } else {
    const double pad = (hi * 0.5 - lo * 0.5) * 0.1;  // 5% of the span each side
    lo -= pad;
    hi += pad;
  }
  lo = clampFinite(lo);
  hi = clampFinite(hi);
  if (!(hi > lo)) {
    // A denormal magnitude whose tenth rounds to zero.
    lo -= 1;
    hi += 1;
  }
  a.lo = lo;
  a.hi = hi;
  return a;
}

struct Tick {
  double pos;  // axis space
  std::string label;
};

std::string trimZeros(std::string s) {
  if (s.find('.') == std::string::npos) return s;
  while (s.back() == '0') {
    s.pop_back();
  }
  if (s.back() == '.') s.pop_back();
  return s;
}

int decimalsFor(double step) {
  return std::clamp(-static_cast<int>(std::floor(std::log10(step) + 1e-9)), 0, 6);
}

}  // namespace

std::string formatTickLabel(double v, double step) {
  if (v == 0) return "0";
  if (!std::isfinite(v)) return "?";
  if (!(step > 0) || !std::isfinite(step)) step = std::fabs(v);
  const std::string sign = v < 0 ? "-" : "";
  const double a = std::fabs(v);
  if (a >= 1e-3 && a < 1e15) {
    struct Unit {
      double scale;
      const char* suffix;
    };
    static constexpr Unit kUnits[] = {{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "k"}, {1, ""}};
    Unit unit = kUnits[4];
    for (const Unit& u : kUnits) {
      if (a >= u.scale) {
        unit = u;
        break;
      }
    }
    const std::string digits =
        trimZeros(fmt::format("{:.{}f}", a / unit.scale, decimalsFor(step / unit.scale)));
    return sign + digits + unit.suffix;
  }
  int e = static_cast<int>(std::floor(std::log10(a)));
  double m = a / std::pow(10.0, e);
  if (m >= 9.9995) {
    m /= 10;
    ++e;
  } else if (m < 1) {
    m *= 10;
    --e;
  }
  const int decimals = std::clamp(e - static_cast<int>(std::floor(std::log10(step) + 1e-9)), 0, 3);
  return sign + trimZeros(fmt::format("{:.{}f}", m, decimals)) + "e" + std::to_string(e);
}

namespace {

// Ticks at multiples of a 1/2/5 x 10^k step, about target of them.
std::vector<Tick> linearTicks(double lo, double hi, int target, bool log_positions) {
  const double raw = (hi * 0.5 - lo * 0.5) / target * 2;
  if (!(raw > 0) || !std::isfinite(raw)) return {};
  const double base = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / base;
  const double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * base;
  if (!(step > 0) || !std::isfinite(step)) return {};
  const double first = std::ceil(lo / step), last = std::floor(hi / step);
  if (!std::isfinite(first) || !std::isfinite(last) || last - first > 100) return {};
  std::vector<Tick> ticks;
  for (int i = 0; i <= static_cast<int>(last - first); ++i) {
    double v = (first + i) * step;
    if (std::fabs(v) < step * 1e-6) v = 0;  // not -2.7e-17
    if (log_positions) {
      if (v <= 0) continue;
      ticks.push_back({std::log10(v), formatTickLabel(v, step)});
    } else {
      ticks.push_back({v, formatTickLabel(v, step)});
    }
  }
  return ticks;
}

// Ticks at 10^e for every every-th e, or at 1, 2 and 5 x 10^e.
std::vector<Tick> logTicks(double lo, double hi, int every, bool one_two_five) {
  std::vector<Tick> ticks;
  const int first = static_cast<int>(std::floor(lo)), last = static_cast<int>(std::ceil(hi));
  for (int e = first; e <= last; ++e) {
    if (!one_two_five && e % every != 0) continue;
    for (const double m : {1.0, 2.0, 5.0}) {
      if (m != 1 && !one_two_five) break;
      const double v = m * std::pow(10.0, e);
      const double pos = std::log10(v);
      if (v > 0 && std::isfinite(v) && pos >= lo && pos <= hi) {
        ticks.push_back({pos, formatTickLabel(v, v)});
      }
    }
  }
  return ticks;
}

using FitsFn = std::function<bool(const std::vector<Tick>&)>;

// The densest ticks that fits() accepts, preferring the natural kind for the
// axis; may return ticks that do not fit when nothing does (they are clipped).
std::vector<Tick> chooseTicks(const Axis& a, const FitsFn& fits) {
  std::vector<Tick> fallback;
  auto accept = [&](std::vector<Tick> t) {
    if (t.size() >= 2 && fits(t)) return true;
    if (!t.empty() && (fallback.empty() || t.size() < fallback.size())) fallback = std::move(t);
    return false;
  };
  if (a.log) {
    const double decades = a.hi - a.lo;
    if (decades < 3) {
      auto t = logTicks(a.lo, a.hi, 1, true);
      if (t.size() >= 2 && fits(t)) return t;
    }
    for (const int every : {1, 2, 3, 5, 10, 20, 50, 100, 200}) {
      auto t = logTicks(a.lo, a.hi, every, false);
      if (accept(t)) return t;
    }
    if (decades < 1.5) {
      // Less than a decade or two: powers of ten alone say too little.
      const double lo = std::pow(10.0, a.lo), hi = std::pow(10.0, a.hi);
      for (int target = 8; target >= 2; --target) {
        auto t = linearTicks(lo, hi, target, true);
        if (t.size() >= 2 && fits(t)) return t;
      }
    }
    return fallback;
  }
  for (int target = 8; target >= 2; --target) {
    auto t = linearTicks(a.lo, a.hi, target, false);
    if (accept(t)) return t;
  }
  return fallback;
}

// ---------------------------------------------------------------------------
// Panels

constexpr int kPad = 8;         // panel edge to content
constexpr int kTickLen = 4;     // outside the axes box
constexpr int kMarker = 6;      // side of a point's square marker
constexpr int kLineWidth = 2;   // series polylines
constexpr int kSwatch = 10;     // legend colour square
constexpr int kLegendRow = 12;  // legend row pitch

struct Point {
  double x, y;  // axis space
  bool drawable;
};

struct PreparedSeries {
  std::vector<Point> points;  // x order
  std::uint32_t rgb;
  std::string label;  // glyphs
};

// Data to axis space, sorted by x. A bad x has no place in x order and is
// dropped; a bad y stays as a gap. xs and ys collect what the axes must show.
std::vector<PreparedSeries> prepareSeries(const Chart& chart, std::vector<double>& xs,
                                          std::vector<double>& ys) {
  std::vector<PreparedSeries> prepared;
  for (const Series& s : chart.series) {
    PreparedSeries p{{}, s.rgb & 0xFFFFFF, toGlyphs(s.label)};
    for (const auto& [x, y] : s.points) {
      const auto ax = toAxis(x, chart.log_x);
      if (!ax) continue;
      const auto ay = toAxis(y, chart.log_y);
      p.points.push_back({*ax, ay.value_or(0), ay.has_value()});
      if (ay) {
        xs.push_back(*ax);
        ys.push_back(*ay);
      }
    }
    std::stable_sort(p.points.begin(), p.points.end(),
                     [](const Point& a, const Point& b) { return a.x < b.x; });
    prepared.push_back(std::move(p));
  }
  return prepared;
}

// The axes box, [left, right] x [top, bottom] inclusive, and the map into it.
struct Plot {
  Axis ax, ay;
  long long left = 0, top = 0, right = 0, bottom = 0;
  double x(double pos) const {
    return static_cast<double>(left) + ax.fraction(pos) * static_cast<double>(right - left);
  }
  double y(double pos) const {
    return static_cast<double>(bottom) - ay.fraction(pos) * static_cast<double>(bottom - top);
  }
  Rect box() const { return {left, top, right + 1, bottom + 1}; }
};

void drawSeries(Canvas& canvas, const Plot& plot, const std::vector<PreparedSeries>& prepared) {
  for (const PreparedSeries& s : prepared) {
    const Point* prev = nullptr;
    for (const Point& p : s.points) {
      if (!p.drawable) {
        prev = nullptr;
        continue;
      }
      if (prev != nullptr) {
        canvas.line(plot.x(prev->x), plot.y(prev->y), plot.x(p.x), plot.y(p.y), kLineWidth, s.rgb);
      }
      prev = &p;
    }
    for (const Point& p : s.points) {
      const double px = plot.x(p.x), py = plot.y(p.y);
      if (!p.drawable || !std::isfinite(px) || !std::isfinite(py)) continue;
      // Centred on the 2x2 line brush at (px, py).
      canvas.fillRect(std::llround(px) - kMarker / 2 + 1, std::llround(py) - kMarker / 2 + 1,
                      kMarker, kMarker, s.rgb);
    }
  }
}

struct LegendEntry {
  std::string label;
  std::uint32_t rgb;
  long long x, row;  // x offset inside the box, row index
};

struct Legend {
  std::vector<LegendEntry> entries;  // only those in the first `rows` rows
  long long rows = 0, width = 0;
  long long height() const { return rows == 0 ? 0 : rows * kLegendRow + 4; }
};

// Entries flow left to right and wrap; series without a label are left out.
Legend layoutLegend(const std::vector<PreparedSeries>& prepared, const Rect& panel) {
  Legend legend;
  const long long avail = panel.width() - 2 * kPad - 8;
  // Never more than a third of the panel: the plot is what matters.
  const long long max_rows = std::max<long long>(1, (panel.height() / 3 - 8) / kLegendRow);
  long long x = 0, row = 0;
  for (const PreparedSeries& s : prepared) {
    if (s.label.empty()) continue;
    std::string label = fitText(s.label, avail - kSwatch - 4, 1);
    const long long w = kSwatch + 4 + textWidth(label, 1);
    if (x > 0 && x + w > avail) {
      x = 0;
      ++row;
    }
    if (row >= max_rows) break;
    legend.entries.push_back({std::move(label), s.rgb, x, row});
    legend.rows = row + 1;
    legend.width = std::max(legend.width, x + w);
    x += w + 14;
  }
  return legend;
}

void drawLegend(Canvas& canvas, const Legend& legend, const Rect& panel, long long top) {
  if (legend.entries.empty()) return;
  const long long x0 = panel.x0 + (panel.width() - legend.width - 8) / 2;
  canvas.frame({x0, top, x0 + legend.width + 8, top + legend.height()}, kFrame);
  for (const LegendEntry& e : legend.entries) {
    const long long x = x0 + 4 + e.x, y = top + 3 + e.row * kLegendRow;
    canvas.fillRect(x, y, kSwatch, kGlyphH - 1, e.rgb);
    canvas.text(x + kSwatch + 4, y, e.label, 1, kBlack);
  }
}

void drawPanel(Canvas& canvas, const Chart& chart, const Rect& panel) {
  canvas.setClip(panel);
  if (canvas.clip().empty()) return;
  const long long inner_width = panel.width() - 2 * kPad;

  std::vector<double> xs, ys;
  const std::vector<PreparedSeries> prepared = prepareSeries(chart, xs, ys);
  const bool has_data = !xs.empty();
  Plot plot;
  plot.ax = fitAxis(xs, chart.log_x);
  plot.ay = fitAxis(ys, chart.log_y);

  // Top down: title, y label (horizontal: the font does not rotate).
  plot.top = panel.y0 + kPad;
  std::string title = toGlyphs(chart.title);
  const int title_scale = textWidth(title, 2) <= inner_width ? 2 : 1;
  title = fitText(std::move(title), inner_width, title_scale);
  if (!title.empty()) {
    canvas.text(panel.x0 + (panel.width() - textWidth(title, title_scale)) / 2, plot.top, title,
                title_scale, kBlack);
    plot.top += kGlyphH * title_scale + 4;
  }
  const std::string y_label = fitText(toGlyphs(chart.y_label), inner_width, 1);
  if (!y_label.empty()) {
    canvas.text(panel.x0 + kPad, plot.top, y_label, 1, kBlack);
    plot.top += kGlyphH + 4;
  }
  plot.top += kGlyphH / 2;  // the top tick label is centred on the box edge

  // Bottom up: legend, x label, x tick labels.
  const Legend legend = layoutLegend(prepared, panel);
  const long long legend_top = panel.y1 - kPad - legend.height();
  plot.bottom = legend.rows > 0 ? legend_top - 8 : legend_top;
  const std::string x_label = fitText(toGlyphs(chart.x_label), inner_width, 1);
  const long long x_label_y = plot.bottom - kGlyphH;
  if (!x_label.empty()) plot.bottom = x_label_y - 4;
  const long long x_tick_label_y = plot.bottom - kGlyphH;
  plot.bottom = x_tick_label_y - kTickLen - 2;

  // y ticks before left and right: their labels decide where the box starts.
  std::vector<Tick> y_ticks;
  if (has_data) {
    y_ticks = chooseTicks(plot.ay, [&](const std::vector<Tick>& t) {
      for (std::size_t i = 1; i < t.size(); ++i) {
        if (plot.y(t[i - 1].pos) - plot.y(t[i].pos) < 28) return false;
      }
      return true;
    });
  }
  long long y_label_width = 0;
  for (const Tick& t : y_ticks) {
    y_label_width = std::max(y_label_width, textWidth(t.label, 1));
  }
  // Labels wider than half the panel are cut rather than squeezing the box away.
  y_label_width = std::min(y_label_width, panel.width() / 2);
  plot.left = panel.x0 + kPad + y_label_width + kTickLen + 3;
  plot.right = panel.x1 - kPad - 10;  // room for half the last x tick label
  std::vector<Tick> x_ticks;
  if (has_data) {
    x_ticks = chooseTicks(plot.ax, [&](const std::vector<Tick>& t) {
      for (std::size_t i = 1; i < t.size(); ++i) {
        const double gap = plot.x(t[i].pos) - plot.x(t[i - 1].pos);
        const double need = std::max<double>(
            40, (textWidth(t[i - 1].label, 1) + textWidth(t[i].label, 1)) / 2 + 10);
        if (gap < need) return false;
      }
      return true;
    });
  }

  const Rect box = plot.box();
  if (!box.empty()) {
    for (const Tick& t : y_ticks) {
      const long long py = std::llround(plot.y(t.pos));
      canvas.hline(plot.left, plot.right, py, kGrid);
      canvas.hline(plot.left - kTickLen, plot.left - 1, py, kBlack);
      const std::string label = fitText(t.label, y_label_width, 1);
      canvas.text(plot.left - kTickLen - 2 - textWidth(label, 1), py - 3, label, 1, kBlack);
    }
    for (const Tick& t : x_ticks) {
      const long long px = std::llround(plot.x(t.pos));
      canvas.vline(px, plot.top, plot.bottom, kGrid);
      canvas.vline(px, plot.bottom + 1, plot.bottom + kTickLen, kBlack);
      canvas.text(px - textWidth(t.label, 1) / 2, x_tick_label_y, t.label, 1, kBlack);
    }
    canvas.setClip(box.intersect(panel));
    drawSeries(canvas, plot, prepared);
    canvas.setClip(panel);
    canvas.frame(box, kBlack);
    if (!has_data) {
      const std::string none = "no data";
      const int scale = box.height() > 4 * kGlyphH && box.width() > textWidth(none, 2) + 8 ? 2 : 1;
      canvas.text(plot.left + (plot.right - plot.left - textWidth(none, scale)) / 2,
                  (plot.top + plot.bottom - kGlyphH * scale) / 2, none, scale, kMuted);
    }
  }
  if (!x_label.empty()) {
    canvas.text(plot.left + (plot.right - plot.left - textWidth(x_label, 1)) / 2, x_label_y,
                x_label, 1, kBlack);
  }
  drawLegend(canvas, legend, panel, legend_top);
}

// ---------------------------------------------------------------------------
// PNG

constexpr auto kCrcTable = [] {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t n = 0; n < 256; ++n) {
    std::uint32_t c = n;
    for (int k = 0; k < 8; ++k) {
      c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    table[n] = c;
  }
  return table;
}();

std::uint32_t crc32(const std::uint8_t* data, std::size_t n) {
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    c = kCrcTable[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  }
  return c ^ 0xFFFFFFFFu;
}

void put32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<std::uint8_t>(v >> shift));
  }
}

void putChunk(std::vector<std::uint8_t>& out, const char (&type)[5],
              const std::vector<std::uint8_t>& data) {
  put32(out, static_cast<std::uint32_t>(data.size()));
  const std::size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put32(out, crc32(&out[start], out.size() - start));
}

// A zlib stream of stored deflate blocks, written straight into out: the raw
// scanlines for an 8192 x 8192 image are 200 MB, not worth a second copy.
class StoredDeflate {
 public:
  static constexpr std::size_t kMaxBlock = 65535;

  StoredDeflate(std::vector<std::uint8_t>& out, std::uint64_t total) : out_(out), left_(total) {
    out_.push_back(0x78);  // deflate, 32K window
    out_.push_back(0x01);  // no preset dictionary, check bits: 0x7801 % 31 == 0
    if (total == 0) startBlock();
  }

  void write(const std::uint8_t* data, std::size_t n) {
    while (n > 0) {
      if (block_left_ == 0) startBlock();
      const std::size_t k = std::min(n, block_left_);
      out_.insert(out_.end(), data, data + k);
      adler(data, k);
      data += k;
      n -= k;
      block_left_ -= k;
    }
  }

  void finish() { put32(out_, (s2_ << 16) | s1_); }

 private:
  void startBlock() {
    const auto len = static_cast<std::uint16_t>(std::min<std::uint64_t>(left_, kMaxBlock));
    left_ -= len;
    out_.push_back(left_ == 0 ? 1 : 0);  // BFINAL, BTYPE 00; the rest of the byte is padding
    const auto nlen = static_cast<std::uint16_t>(~len);
    out_.push_back(static_cast<std::uint8_t>(len));
    out_.push_back(static_cast<std::uint8_t>(len >> 8));
    out_.push_back(static_cast<std::uint8_t>(nlen));
    out_.push_back(static_cast<std::uint8_t>(nlen >> 8));
    block_left_ = len;
  }

  void adler(const std::uint8_t* data, std::size_t n) {
    // 5552 is the most bytes before s2 can overflow 32 bits (zlib's NMAX).
    while (n > 0) {
      const std::size_t k = std::min<std::size_t>(n, 5552);
      for (std::size_t i = 0; i < k; ++i) {
        s1_ += data[i];
        s2_ += s1_;
      }
      s1_ %= 65521;
      s2_ %= 65521;
      data += k;
      n -= k;
    }
  }

  std::vector<std::uint8_t>& out_;
  std::uint64_t left_;  // raw bytes not yet given a block
  std::size_t block_left_ = 0;
  std::uint32_t s1_ = 1, s2_ = 0;
};

std::vector<std::uint8_t> encodePng(const Canvas& canvas) {
  const auto width = static_cast<std::uint32_t>(canvas.width());
  const auto height = static_cast<std::uint32_t>(canvas.height());
  const std::size_t row_bytes = 1 + 3 * static_cast<std::size_t>(width);
  const std::uint64_t raw = static_cast<std::uint64_t>(height) * row_bytes;
  const std::uint64_t blocks = (raw + StoredDeflate::kMaxBlock - 1) / StoredDeflate::kMaxBlock;

  std::vector<std::uint8_t> out;
  out.reserve(static_cast<std::size_t>(8 + 25 + 12 + 2 + raw + 5 * blocks + 4 + 12));
  const std::uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  out.insert(out.end(), signature, signature + 8);

  std::vector<std::uint8_t> ihdr;
  put32(ihdr, width);
  put32(ihdr, height);
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit RGB, deflate, adaptive filters, no interlace
  putChunk(out, "IHDR", ihdr);

  const std::size_t idat = out.size();
  put32(out, 0);  // length, patched below
  out.insert(out.end(), {'I', 'D', 'A', 'T'});
  StoredDeflate z(out, raw);
  const std::uint8_t filter_none = 0;
  for (std::uint32_t y = 0; y < height; ++y) {
    z.write(&filter_none, 1);
    z.write(&canvas.pixels()[static_cast<std::size_t>(y) * 3 * width], 3 * width);
  }
  z.finish();
  const auto length = static_cast<std::uint32_t>(out.size() - idat - 8);
  for (int i = 0; i < 4; ++i) {
    out[idat + i] = static_cast<std::uint8_t>(length >> (24 - 8 * i));
  }
  put32(out, crc32(&out[idat + 4], out.size() - idat - 4));

  putChunk(out, "IEND", {});
  return out;
}

bool validSize(int width, int height) {
  return width >= kMinImageSide && width <= kMaxImageSide && height >= kMinImageSide &&
         height <= kMaxImageSide;
}

}  // namespace

std::vector<std::uint8_t> renderPng(const std::vector<Chart>& charts, int width, int height) {
  if (!validSize(width, height)) return {};
  Canvas canvas(width, height);
  const auto n = static_cast<long long>(charts.size());
  for (long long i = 0; i < n; ++i) {
    // More charts than columns leaves some panels empty; they are skipped.
    const Rect panel{i * width / n, 0, (i + 1) * width / n, height};
    drawPanel(canvas, charts[static_cast<std::size_t>(i)], panel);
  }
  return encodePng(canvas);
}

Status writePng(const std::string& path, const std::vector<Chart>& charts, int width, int height) {
  if (!validSize(width, height)) {
    return Status::error(fmt::format(
        "cannot plot to {}: image size {}x{} is not accepted; width and height must each be "
        "{}..{}",
        path, width, height, kMinImageSide, kMaxImageSide));
  }
  const std::vector<std::uint8_t> png = renderPng(charts, width, height);
  const auto failed = [&](const char* what) {
    return Status::error(fmt::format("cannot {} {}: {}", what, path, std::strerror(errno)));
  };
  int fd;
  do {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  } while (fd == -1 && errno == EINTR);
  if (fd == -1) return failed("open for writing");
  UniqueFd file(fd);
  std::size_t done = 0;
  while (done < png.size()) {
    const ssize_t n = ::write(file.get(), png.data() + done, png.size() - done);
    if (n == -1 && errno == EINTR) continue;
    if (n == -1) return failed("write");
    done += static_cast<std::size_t>(n);
  }
  // close() reports deferred write errors (NFS, full disk); it is not retried.
  if (::close(file.release()) != 0) return failed("close");
  return Status::okStatus();
}

}  // namespace stmux::tools
