"""stmux-plot (tools/stmux_plot.py): what it draws from stmux-bench's JSON, and
how it refuses what it cannot draw. Run by ctest with a python3 that has
matplotlib: `python3 tests/stmux_plot_test.py PATH_TO_stmux-plot`."""
import importlib.machinery
import json
import os
import struct
import subprocess
import sys
import tempfile
import types
import unittest

SCRIPT = None  # the stmux-plot under test, from the command line


def point(shape, tenants, mode, rate, valid=True):
    row = {"shape": shape, "tenants": tenants, "mode": mode, "valid": valid, "note": ""}
    if valid:
        row.update(gemms_per_s=rate, p99_us=100.0 + tenants, worst_tenant_p99_us=200.0 + tenants,
                   unit="GEMMs/s")
    return row


def bench_json(path, points):
    with open(path, "w") as f:
        json.dump({"points": points}, f)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def run(*args, python=None):
    return subprocess.run([python or sys.executable, SCRIPT, *args], capture_output=True,
                          text=True, timeout=120)


class StmuxPlot(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = lambda name: os.path.join(self.dir.name, name)

    def tearDown(self):
        self.dir.cleanup()

    def test_each_shape_gets_a_row_of_two_charts(self):
        rows = [point(s, r, m, 1000.0 * r) for s in ("cube", "rnn") for r in (1, 8, 32)
                for m in ("time-only", "mps", "stmux")]
        rows.append(point("cube", 64, "mps", 0, valid=False))  # left out, not plotted
        bench_json(self.path("bench.json"), rows)
        ran = run(self.path("bench.json"))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertIn("wrote " + self.path("bench.png"), ran.stdout)
        self.assertEqual(png_size(self.path("bench.png")), (1200, 800))  # 2 shapes x 400 px

    def test_a_shape_of_one_r_is_drawn_as_bars_per_mode(self):
        # The demo's rows: R = 32 alone. Lines against R would be single points.
        loader = importlib.machinery.SourceFileLoader("stmux_plot", SCRIPT)
        plot = types.ModuleType(loader.name)
        loader.exec_module(plot)
        one_r = [point("cube", 32, m, 1000.0) for m in ("time-only", "mps", "stmux")]
        self.assertTrue(plot.as_bars(one_r))
        self.assertFalse(plot.as_bars(one_r + [point("cube", 8, "mps", 10.0)]))
        self.assertEqual(plot.modes_of([point("cube", 32, m, 1.0) for m in ("x", "stmux", "mps")]),
                         ["mps", "stmux", "x"])
        bench_json(self.path("bench.json"), one_r)
        ran = run(self.path("bench.json"))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertEqual(png_size(self.path("bench.png")), (1200, 400))

    def test_a_comparison_draws_the_rows_both_files_have(self):
        bench_json(self.path("a.json"), [point("cube", 32, "stmux", 100.0),
                                         point("cube", 8, "stmux", 50.0)])
        bench_json(self.path("b.json"), [point("cube", 32, "stmux", 150.0)])
        ran = run("--compare", self.path("a.json"), self.path("b.json"), "-o",
                  self.path("c.png"))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        width, height = png_size(self.path("c.png"))
        self.assertGreater(width, 0)
        bench_json(self.path("d.json"), [point("rnn", 1, "mps", 10.0)])
        ran = run("--compare", self.path("a.json"), self.path("d.json"))
        self.assertEqual(ran.returncode, 1)
        self.assertIn("no valid row in common", ran.stderr)

    def test_what_it_cannot_draw_is_refused_with_the_reason(self):
        with open(self.path("junk.json"), "w") as f:
            f.write("{not json")
        ran = run(self.path("junk.json"))
        self.assertEqual(ran.returncode, 2)
        self.assertIn("is not JSON", ran.stderr)
        bench_json(self.path("other.json"), [])
        with open(self.path("other.json"), "w") as f:
            json.dump({"rows": []}, f)
        ran = run(self.path("other.json"))
        self.assertEqual(ran.returncode, 2)
        self.assertIn("has no 'points' list", ran.stderr)
        bench_json(self.path("invalid.json"), [point("cube", 1, "mps", 0, valid=False)])
        ran = run(self.path("invalid.json"))
        self.assertEqual(ran.returncode, 1)
        self.assertIn("no valid row to plot", ran.stderr)
        ran = run(self.path("absent.json"))
        self.assertEqual(ran.returncode, 2)
        self.assertIn("cannot read", ran.stderr)
        ran = run("--compare", self.path("invalid.json"))
        self.assertEqual(ran.returncode, 2)
        with open(self.path("binary.json"), "wb") as f:
            f.write(b"\xff\xfe\x00")
        ran = run(self.path("binary.json"))
        self.assertEqual(ran.returncode, 2)
        self.assertIn("is not JSON", ran.stderr)

    def test_a_plot_it_cannot_write_is_refused_with_the_reason(self):
        bench_json(self.path("bench.json"), [point("cube", 1, "mps", 10.0)])
        ran = run(self.path("bench.json"), "-o", self.path("no/such/folder/plot.png"))
        self.assertEqual(ran.returncode, 2, ran.stderr)
        self.assertIn("cannot write", ran.stderr)
        ran = run(self.path("bench.json"), "-o", self.path("plot.notaformat"))
        self.assertEqual(ran.returncode, 2, ran.stderr)
        self.assertIn("cannot write", ran.stderr)

    def test_a_row_with_nothing_before_is_left_out_of_a_comparison(self):
        bench_json(self.path("before.json"), [point("cube", 1, "mps", 0.0),
                                              point("cube", 2, "mps", 10.0)])
        bench_json(self.path("after.json"), [point("cube", 1, "mps", 5.0),
                                             point("cube", 2, "mps", 20.0)])
        ran = run("--compare", self.path("before.json"), self.path("after.json"),
                  "-o", self.path("compare.png"))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        bench_json(self.path("zero.json"), [point("cube", 1, "mps", 0.0)])
        ran = run("--compare", self.path("zero.json"), self.path("after.json"))
        self.assertEqual(ran.returncode, 1, ran.stderr)
        self.assertIn("above 0 before", ran.stderr)

    def test_without_matplotlib_it_says_how_to_get_it(self):
        bench_json(self.path("bench.json"), [point("cube", 1, "mps", 10.0)])
        hide = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
        ran = subprocess.run([sys.executable, "-c", hide, SCRIPT, self.path("bench.json")],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(ran.returncode, 3)
        self.assertIn("apt-get install python3-matplotlib", ran.stderr)


if __name__ == "__main__":
    SCRIPT = sys.argv.pop(1)
    unittest.main()
