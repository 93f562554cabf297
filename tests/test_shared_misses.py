"""``benchmarks/shared_misses.py``: the films every model missed, against a hand-made pair of score files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("shared_misses", ROOT / "benchmarks" / "shared_misses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _film(path: str, label: str, normal: float, pneumonia: float) -> dict:
    predicted = "NORMAL" if normal > pneumonia else "PNEUMONIA"
    return {"path": path, "label": label, "predicted": predicted, "prob_COVID19": round(1 - normal - pneumonia, 4),
            "prob_NORMAL": normal, "prob_PNEUMONIA": pneumonia}


def _scores(folder: Path, option: str, test: list[dict], val: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True)
    path = folder / "scores.json"
    other = {**_film("test/PNEUMONIA/kid.jpg", "PNEUMONIA", 0.99, 0.0), "group": "kids"}  # missed, not in focus
    path.write_text(json.dumps({option: {split: {"focus_group": "nih", "films": [{**film, "group": "nih"} for film in films]
                                                 + [other]}
                                         for split, films in [("val", val or []), ("test", test)]}}))
    return path


def test_only_films_every_model_missed_are_listed_most_confident_first(tmp_path, capsys):
    a = _scores(tmp_path / "a", "keep-none-36", [_film("test/PNEUMONIA/p1.jpg", "PNEUMONIA", 0.9, 0.08),
                                                 _film("test/PNEUMONIA/p2.jpg", "PNEUMONIA", 0.6, 0.3),
                                                 _film("test/NORMAL/n1.jpg", "NORMAL", 0.2, 0.7)])
    b = _scores(tmp_path / "b", "keep-none-36", [_film("test/PNEUMONIA/p2.jpg", "PNEUMONIA", 0.55, 0.4),
                                                 _film("test/NORMAL/n1.jpg", "NORMAL", 0.3, 0.65),
                                                 _film("test/PNEUMONIA/p1.jpg", "PNEUMONIA", 0.7, 0.25)],
                 val=[_film("val/NORMAL/n9.jpg", "NORMAL", 0.1, 0.8)])
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"file": ["Data/test/PNEUMONIA/p1.jpg", "Data/test/NORMAL/n1.jpg"],
                  "source_path": ["Pneumonia/00001301_039.png", "No_findings/00000001_000.png"],
                  "split": ["test", "test"]}).to_csv(manifest, index=False)

    shared = _script().main(["--scores", str(a), str(b), "--manifest", str(manifest)])

    # p1: max P(label) 0.25; n1: 0.3; p2: 0.4 (b only has it at 0.4, a at 0.3)
    assert list(shared["path"]) == ["test/PNEUMONIA/p1.jpg", "test/NORMAL/n1.jpg", "test/PNEUMONIA/p2.jpg"]
    assert list(shared["max"]) == pytest.approx([0.25, 0.3, 0.4])
    assert list(shared["a/keep-none-36"]) == pytest.approx([0.08, 0.2, 0.3])
    table = capsys.readouterr().out
    assert "3 films misclassified by all 2 models" in table
    assert "| test/PNEUMONIA/p1.jpg | PNEUMONIA | Pneumonia/00001301_039.png | 0.080 | 0.250 |" in table
    assert "| test/PNEUMONIA/p2.jpg | PNEUMONIA | - | 0.300 | 0.400 |" in table


def test_a_film_one_model_got_right_is_not_shared(tmp_path):
    a = _scores(tmp_path / "a", "x", [_film("test/PNEUMONIA/p1.jpg", "PNEUMONIA", 0.9, 0.08)])
    b = _scores(tmp_path / "b", "x", [_film("test/PNEUMONIA/p1.jpg", "PNEUMONIA", 0.3, 0.68)])
    assert _script().main(["--scores", str(a), str(b)]).empty
    val = _script().main(["--scores", str(a), str(b), "--split", "val"])
    assert val.empty


def test_scores_without_the_lists_name_the_file_and_the_fix(tmp_path, capsys):
    path = tmp_path / "old" / "scores.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"keep-none-36": {"test": {"accuracy": 0.9}}}))
    with pytest.raises(SystemExit):
        _script().run(lambda: _script().main(["--scores", str(path)]))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: option keep-none-36 has no scored focus films")
    assert "\n" not in err
