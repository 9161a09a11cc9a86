#!/usr/bin/env python3
"""stmux-plot: plots of stmux-bench results (its bench.json), with matplotlib.

  stmux-plot bench.json [-o bench.png]
      for each shape, throughput and tail latency against the number of
      tenants, one line per mode (bars per mode where a shape has rows of
      one R alone, as the demo's); invalid rows are left out
  stmux-plot --compare before.json after.json [-o compare.png]
      for every row valid in both, after / before: throughput and the worst
      tenant's p99 (below 1 is better for the tail, above 1 for throughput)

The bench writes the numbers; plotting is this script's job alone, the way
nvbench leaves plots to scripts. Exit status: 0 written, 1 nothing to plot,
2 bad usage or an unreadable or unwritable file, 3 matplotlib is not installed.
"""
import argparse
import json
import os
import sys

MODE_COLORS = {"time-only": "#888888", "mps": "#1f77b4", "stmux": "#d62728",
               "stmux-mps": "#ff7f0e", "ceiling": "#2ca02c"}


def fail(code, message):
    print(f"stmux-plot: {message}", file=sys.stderr)
    sys.exit(code)


def load(path):
    """The valid rows of one bench.json, as dicts."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as error:
        fail(2, f"cannot read {path}: {error.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        fail(2, f"{path} is not JSON: {error}")
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list):
        fail(2, f"{path} has no 'points' list: is it stmux-bench's bench.json?")
    rows = []
    for point in points:
        # "ran": what files written before the start barrier call it.
        if not isinstance(point, dict) or not point.get("valid", point.get("ran")):
            continue
        try:
            rows.append({"shape": str(point["shape"]), "tenants": int(point["tenants"]),
                         "mode": str(point["mode"]), "rate": float(point["gemms_per_s"]),
                         "unit": str(point.get("unit", "GEMMs/s")),
                         "p99": float(point["p99_us"]),
                         "worst_p99": float(point["worst_tenant_p99_us"])})
        except (KeyError, TypeError, ValueError) as error:
            fail(2, f"{path}: a valid row lacks a number ({error!r}): {point}")
    return rows


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail(3, f"matplotlib is not installed for {sys.executable} "
                "(Debian: apt-get install python3-matplotlib)")
    return plt


def modes_of(rows):
    """The modes of `rows`, the bench's own in its order first."""
    modes = [m for m in MODE_COLORS if any(r["mode"] == m for r in rows)]
    return modes + sorted({r["mode"] for r in rows} - set(modes))


def as_bars(rows):
    """Whether one shape's rows are drawn as bars, one per mode: when they
    are all of one R (the demo's), a line against R would be single points."""
    return len({r["tenants"] for r in rows}) == 1


def plot_bars(rate_axis, tail_axis, shape, mine):
    modes = modes_of(mine)
    by_mode = {r["mode"]: r for r in mine}
    colors = [MODE_COLORS.get(m, "#555555") for m in modes]
    positions = range(len(modes))
    rate_axis.bar(positions, [by_mode[m]["rate"] for m in modes], color=colors)
    width = 0.4
    tail_axis.bar([p - width / 2 for p in positions], [by_mode[m]["worst_p99"] for m in modes],
                  width, color=colors, label="worst tenant")
    tail_axis.bar([p + width / 2 for p in positions], [by_mode[m]["p99"] for m in modes],
                  width, color=colors, alpha=0.5, label="all calls")
    tenants = mine[0]["tenants"]
    rate_axis.set(title=f"{shape}, R={tenants}: throughput", ylabel=mine[0]["unit"], yscale="log")
    tail_axis.set(title=f"{shape}, R={tenants}: p99 latency (worst tenant, all calls)",
                  ylabel="us", yscale="log")
    for axis in (rate_axis, tail_axis):
        axis.set_xticks(list(positions), modes)
        axis.grid(True, axis="y", which="both", alpha=0.3)
    tail_axis.legend(fontsize="small")


def plot_runs(rows, out):
    plt = pyplot()
    shapes = sorted({r["shape"] for r in rows})
    figure, axes = plt.subplots(len(shapes), 2, figsize=(12, 4 * len(shapes)), squeeze=False)
    for (rate_axis, tail_axis), shape in zip(axes, shapes):
        mine = [r for r in rows if r["shape"] == shape]
        if as_bars(mine):
            plot_bars(rate_axis, tail_axis, shape, mine)
            continue
        for mode in modes_of(mine):
            line = sorted((r for r in mine if r["mode"] == mode), key=lambda r: r["tenants"])
            color = MODE_COLORS.get(mode)
            tenants = [r["tenants"] for r in line]
            rate_axis.plot(tenants, [r["rate"] for r in line], "o-", color=color, label=mode)
            tail_axis.plot(tenants, [r["worst_p99"] for r in line], "o-", color=color,
                           label=f"{mode}, worst tenant")
            tail_axis.plot(tenants, [r["p99"] for r in line], "o:", color=color, alpha=0.6,
                           label=f"{mode}, all calls")
        rate_axis.set(title=f"{shape}: throughput", xlabel="tenants R", ylabel=mine[0]["unit"],
                      xscale="log", yscale="log")
        tail_axis.set(title=f"{shape}: p99 latency", xlabel="tenants R", ylabel="us",
                      xscale="log", yscale="log")
        for axis in (rate_axis, tail_axis):
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize="small")
    save(figure, out)


def save(figure, out):
    figure.tight_layout()
    try:
        figure.savefig(out, dpi=100)
    except (OSError, ValueError) as error:  # no such folder; a format matplotlib lacks
        fail(2, f"cannot write {out}: {getattr(error, 'strerror', None) or error}")


def plot_comparison(before, after, out):
    plt = pyplot()
    key = lambda r: (r["shape"], r["tenants"], r["mode"])  # noqa: E731
    old = {key(r): r for r in before}
    # A ratio needs a before above 0 (a row that ran and did nothing).
    pairs = [(old[key(r)], r) for r in after
             if key(r) in old and old[key(r)]["rate"] > 0 and old[key(r)]["worst_p99"] > 0]
    if not pairs:
        fail(1, "the two files have no valid row in common (shape, tenants and mode) "
                "with a rate and a p99 above 0 before")
    pairs.sort(key=lambda p: key(p[1]))
    labels = [f"{n['shape']} R={n['tenants']} {n['mode']}" for _, n in pairs]
    figure, (rate_axis, tail_axis) = plt.subplots(
        2, 1, figsize=(max(8, 0.5 * len(pairs)), 9), sharex=True)
    positions = range(len(pairs))
    rate_axis.bar(positions, [n["rate"] / o["rate"] for o, n in pairs],
                  color=[MODE_COLORS.get(n["mode"], "#555555") for _, n in pairs])
    tail_axis.bar(positions, [n["worst_p99"] / o["worst_p99"] for o, n in pairs],
                  color=[MODE_COLORS.get(n["mode"], "#555555") for _, n in pairs])
    rate_axis.set(ylabel="throughput, after / before")
    tail_axis.set(ylabel="worst tenant's p99, after / before")
    for axis in (rate_axis, tail_axis):
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.grid(True, axis="y", alpha=0.3)
    tail_axis.set_xticks(list(positions), labels, rotation=70, ha="right", fontsize="small")
    save(figure, out)


def main():
    parser = argparse.ArgumentParser(
        prog="stmux-plot", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 written, 1 nothing to plot, 2 bad usage or an unreadable "
               "or unwritable file, 3 matplotlib is not installed.")
    parser.add_argument("files", nargs="+", metavar="BENCH_JSON",
                        help="stmux-bench's bench.json (two with --compare)")
    parser.add_argument("--compare", action="store_true",
                        help="compare the second file with the first")
    parser.add_argument("-o", "--out", help="the PNG to write (default: beside the input, "
                                            "bench.png or compare.png)")
    args = parser.parse_args()
    if args.compare != (len(args.files) == 2) or len(args.files) > 2:
        parser.error("give one file, or two with --compare")
    first = args.files[-1 if args.compare else 0]
    out = args.out or os.path.join(os.path.dirname(first) or ".",
                                   "compare.png" if args.compare else "bench.png")
    if args.compare:
        plot_comparison(load(args.files[0]), load(args.files[1]), out)
    else:
        rows = load(first)
        if not rows:
            fail(1, f"{first} has no valid row to plot")
        plot_runs(rows, out)
    print(f"stmux-plot: wrote {out}")


if __name__ == "__main__":
    main()
