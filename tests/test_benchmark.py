"""`imagine-flash benchmark`: the findings on given numbers, and `--quick` end to end on a few rows (about a minute)."""
import json

import pytest

from imagine_flash.benchmark import ROWS, STUDENTS, BenchmarkConfig, clock_rows, findings
from imagine_flash.config import ConfigError

from conftest import needs_data, needs_inception


def _row(method, steps, fid, acc, variant="full", ms=1.0):
    return {"method": method, "steps": steps, "variant": variant, "fid": fid, "color_acc": acc, "class_acc": acc,
            "ms_per_image": ms, "rel_fid": fid}


def test_findings_are_judged_on_the_numbers():
    rows = [_row("teacher-dpmpp", 25, 100.0, 0.9, ms=60.0), _row("flash", 3, 104.0, 0.95, ms=3.0),
            _row("lcm", 3, 110.0, 0.96), _row("flash", 3, 103.0, 0.99, variant="no-disc")]
    got = {claim: ok for claim, ok, _ in findings(rows)}
    assert got["flash 3-step FID within 5% of teacher-dpmpp-25 (paper: 99.4%)"] is True
    assert got["flash-3 beats lcm-3 in FID and alignment"] is False  # better FID, worse alignment
    assert got["ablation no-disc is worse than full in FID or alignment"] is False
    assert got["flash-3 ms/image at least 15x smaller than teacher-dpmpp-25"] is True


def test_protocol_has_every_row_and_student():
    assert len(ROWS) == 18 and len(STUDENTS) == 10
    assert {r.student for r in ROWS if r.student} == {key for key, *_ in STUDENTS}
    assert (ROWS[0].method, ROWS[0].steps) == ("teacher-dpmpp", 25)  # the reference of Table 4
    timed = clock_rows(BenchmarkConfig())  # the marks, for flash and LCM at least
    assert {(r.method, r.minutes) for r in timed} >= {(m, t) for m in ("flash", "lcm") for t in (5, 10, 20, 40, 80)}
    assert len({r.key for r in ROWS + timed}) == len(ROWS) + len(timed)  # every row its own file
    for bad in ("progressive-4", "flash-7"):  # a clock cannot fix progressive's stage schedule in advance
        with pytest.raises(ConfigError, match=bad):
            clock_rows(BenchmarkConfig(clock_students=(bad,)))


def test_equal_time_findings_compare_at_each_mark():
    rows = [_row("teacher-dpmpp", 25, 95.0, 0.96), _row("flash", 3, 104.0, 0.95), _row("lcm", 3, 110.0, 0.9)]
    rows += [{**_row("flash", 3, f, 0.95), "minutes": m} for f, m in ((150.0, 5.0), (100.0, 10.0))]
    rows += [{**_row("lcm", 3, f, 0.9), "minutes": m} for f, m in ((120.0, 5.0), (110.0, 10.0))]
    got = {claim: ok for claim, ok, _ in findings(rows)}
    assert got["flash-3 beats lcm-3 in FID and alignment after 5 training minutes"] is False
    assert got["flash-3 beats lcm-3 in FID and alignment after 10 training minutes"] is True
    assert got["flash-3 beats lcm-3 in FID and alignment"] is True  # the equal-update rows, not the timed ones
    assert got["flash-3 FID at most 1.10x teacher-dpmpp-25's after 10 training minutes"] is True  # 100 <= 104.5
    assert got["flash-3 FID at most 1.10x teacher-dpmpp-25's after 5 training minutes"] is False
    assert not any("teacher-dpmpp-3" in claim for claim in got)  # no such row given


@needs_data
@needs_inception
@pytest.mark.slow
def test_benchmark_quick_end_to_end(tmp_path, monkeypatch):
    """`benchmark --quick` on one student and two of the protocol's rows (the reference and flash), plus that student
    against the clock at two marks: training, measuring, results.json/md, the plots, the grid, and resuming. All 18 rows are the same code path (the baselines'
    exported samplers are checked in test_baselines.py); the findings on them are judged in
    test_findings_are_judged_on_the_numbers."""
    from PIL import Image

    from imagine_flash import benchmark
    from imagine_flash.cli import main

    rows = [r for r in ROWS if r.key in ("teacher-dpmpp-full-25", "flash-full-1")]
    monkeypatch.setattr(benchmark, "ROWS", rows)
    monkeypatch.setattr(benchmark, "STUDENTS", [s for s in STUDENTS if s[0] == "flash-1"])
    out = tmp_path / "bench"
    argv = ["benchmark", "--quick", "--out", str(out), "--threads", "1", "--fid-reference", "16",
            "--minutes", "0.01,0.15", "--clock-students", "flash-1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["steps"], r["minutes"]) for r in res["rows"]] == [
        ("teacher-dpmpp", 25, None), ("flash", 1, None), ("flash", 1, 0.01), ("flash", 1, 0.15)]
    # One run against the clock, measured at each mark: more minutes, more updates. The second mark is 9 s after
    # the first (0.6 s), so that one slow update under load cannot cross both marks at once.
    timed = res["rows"][2:]
    assert 0.01 <= timed[0]["train_minutes"] < timed[1]["train_minutes"] and timed[1]["train_minutes"] >= 0.15
    assert 1 <= timed[0]["train_steps"] < timed[1]["train_steps"]
    assert "At equal training minutes" in (out / "results.md").read_text()
    keys = {"method", "steps", "variant", "nfe", "fid", "kid", "fid_indomain", "color_acc", "class_acc",
            "ms_per_image", "rel_fid", "rel_alignment", "train_minutes"}
    for r in res["rows"]:
        assert keys <= r.keys()
        assert all(isinstance(r[k], (int, float)) for k in keys - {"method", "variant", "train_minutes"})
    assert res["rows"][0]["rel_fid"] == 100.0
    for f in ("results.md", "fid_vs_steps.png", "alignment_vs_steps.png", "fid_vs_ms.png", "fid_vs_minutes.png",
              "grid.png"):
        assert (out / f).is_file(), f
    assert Image.open(out / "grid.png").height > len(rows) * 16 * 4  # one row of 8 images per benchmark row
    # Resumable: a second run recomputes nothing (every student and row is found on disk).
    stamp = {p: p.stat().st_mtime_ns for p in [*(out / "rows").glob("*.json"), *(out / "students").rglob("*.json")]}
    assert len(list((out / "rows").glob("*.json"))) == len(rows) + 2
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # --part minutes: the teacher's rows and the equal-time ones (all found on disk), no equal-update student.
    assert main(argv + ["--part", "minutes"]) == 0
    part = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["minutes"]) for r in part] == [("teacher-dpmpp", None), ("flash", 0.01), ("flash", 0.15)]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
