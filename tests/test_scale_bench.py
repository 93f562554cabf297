"""Smoke test of benchmarks/scale.py: every stage measured at two sizes, rows in the promised form (no timing checks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"stage", "images", "images_per_s", "peak_anon_mb", "peak_rss_mb"}


@pytest.mark.slow
def test_scale_benchmark_measures_each_stage_at_each_size(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sizes", "400", "200", "--image-size", "32",
         "--steps", "1", "--rounds", "2", "--workers", "1", "--workdir", str(tmp_path), "--out", str(out)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(row["stage"], row["images"]) for row in report["rows"]] == [
        ("preprocess", 200), ("train", 64), ("evaluate", 200), ("preprocess", 400), ("train", 64), ("evaluate", 400)]
    for row in [*report["rows"], report["in_ram_train"]]:
        assert set(row) == ROW_KEYS
        assert row["images_per_s"] > 0 and 0 < row["peak_anon_mb"] <= row["peak_rss_mb"]
    assert report["in_ram_train"]["images"] == 64
    assert [path.name for path in tmp_path.iterdir()] == ["scale.json"]  # the generated sets are gone
