"""`imagine-flash benchmark --quick`: the whole protocol at toy size, end to end (a few minutes on 2 cores)."""
import json

import pytest

from imagine_flash.benchmark import ROWS, findings

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


@needs_data
@needs_inception
@pytest.mark.slow
def test_benchmark_quick_end_to_end(tmp_path):
    from PIL import Image

    from imagine_flash.cli import main

    out = tmp_path / "bench"
    assert main(["benchmark", "--quick", "--out", str(out), "--threads", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == len(ROWS) == 18
    keys = {"method", "steps", "variant", "nfe", "fid", "kid", "fid_indomain", "color_acc", "class_acc",
            "ms_per_image", "rel_fid", "rel_alignment", "train_minutes"}
    for r in res["rows"]:
        assert keys <= r.keys()
        assert all(isinstance(r[k], (int, float)) for k in keys - {"method", "variant", "train_minutes"})
    assert res["rows"][0]["rel_fid"] == 100.0
    for f in ("results.md", "fid_vs_steps.png", "alignment_vs_steps.png", "fid_vs_ms.png", "grid.png"):
        assert (out / f).is_file(), f
    assert Image.open(out / "grid.png").height > 18 * 16 * 4  # one row of 8 images per benchmark row
    # Resumable: a second run recomputes nothing (every student and row is found on disk).
    stamp = {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")}
    assert main(["benchmark", "--quick", "--out", str(out), "--threads", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")} == stamp
