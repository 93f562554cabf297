"""Changing a key of each params section reruns exactly the stages that must rerun, and nothing else.

Each test changes one param in a copy of the session's reproduced mini project (conftest's
``reproduced_mini``) and holds the stages that must rerun, :data:`EXPECTED_RERUNS`, against two things:

* ``dvc status``: the stages that read the key (their ``params:`` in ``dvc.yaml``). Each must be
  expected (else its list is too broad), and every expected stage must be one of them or come after
  one in ``dvc dag`` (else a list is too narrow: nothing could make it rerun).
* Where the expected stages are all of those and every stage after them, nothing more is left to
  check: the stages that read the key write new outputs, and DVC reruns whatever depends on a changed
  output. Where fewer are expected, the reruns stop at an output we promise to write byte for byte
  the same (the same data/raw, the same arrays, the same predictions), which only a real run shows:
  those keys run ``dvc repro`` and compare the stages that ran with the expected ones, exactly.

A key checked by status alone is set back afterwards. A key checked by a run stays changed, and its
new value was never used in this project (DVC's run-cache would otherwise restore a stage instead of
running it, see treeverse/dvc#10296). The tests share the copy, so they run in the order below; each
first checks that the project is up to date, so one failure does not change what the next one measures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Reproduced
from test_pipeline import copy_project, ran_stages, sh

pytestmark = pytest.mark.slow

ALL_STAGES = frozenset({
    "download", "split", "audit", "preprocess", "train@custom", "train@extract", "train@finetune",
    "evaluate@custom", "evaluate@extract", "evaluate@finetune", "train_probe", "shortcuts", "external", "compare",
})
EVALUATE = frozenset({"evaluate@custom", "evaluate@extract", "evaluate@finetune"})
FROM_PREPROCESS = ALL_STAGES - {"download", "split", "audit"}
FROM_SPLIT = ALL_STAGES - {"download"}

# param (dotted key) -> (new value, never used before in this module; stages that must rerun, exactly)
EXPECTED_RERUNS: dict[str, tuple[Any, frozenset[str]]] = {
    # Only the download stage reads data.kaggle_handle (and ignores it for a local source), so
    # download reruns, writes the same data/raw, and nothing downstream may follow.
    "data.kaggle_handle": ("someone/else/versions/2", frozenset({"download"})),
    # The split changes (4 folds -> 3), so every stage that reads the split reruns.
    "split.val_fraction": (0.3, FROM_SPLIT),
    # audit.json records the threshold and preprocess copies it into metrics/data.json, so
    # preprocess reruns; its arrays are unchanged (no dedupe), so training does not.
    "audit.threshold": (6, frozenset({"audit", "preprocess"})),
    # New pixels: preprocess, all three models, their evaluations and the comparison.
    "preprocess.image_size": (36, FROM_PREPROCESS),
    # Speed only: the same hashes and byte-identical arrays for any count (test_audit.py, test_preprocess.py),
    # so dvc.yaml does not track them and nothing reruns.
    "audit.workers": (1, frozenset()),
    "preprocess.workers": (2, frozenset()),
    # One recipe: its model, its evaluation, the shortcut audit and external scores of the new model, and the comparison.
    # The border probe is the custom CNN's recipe on hidden lungs, so train_custom.* retrains it too.
    # (custom: width, not lr: with ema_decay 0.998 the one tiny step of these runs barely moves the saved
    # average, so a new lr can leave the predictions identical to 6 decimals and compare rightly stays put)
    "train_custom.width": (12, frozenset({"train@custom", "evaluate@custom", "train_probe", "shortcuts", "external",
                                           "compare"})),
    "train_extract.lr": (0.002, frozenset({"train@extract", "evaluate@extract", "shortcuts", "external", "compare"})),
    "train_finetune.lr": (0.0005, frozenset({"train@finetune", "evaluate@finetune", "shortcuts", "external", "compare"})),
    # Shared by every training stage (the probe's too): all models change, so everything after them reruns.
    "train.seed": (7, frozenset({"train@custom", "train@extract", "train@finetune", "train_probe", "shortcuts"})
                   | EVALUATE | {"external", "compare"}),
    # CPU threads change float sums, so the weights (1 vs 2 threads: other custom and finetune weights): as train.seed.
    "train.threads": (2, frozenset({"train@custom", "train@extract", "train@finetune", "train_probe", "shortcuts"})
                      | EVALUATE | {"external", "compare"}),
    # Speed only, the same weights bit for bit (test_train.py): untracked, nothing reruns.
    "train.reuse_freed_memory": (False, frozenset()),
    "train.gpu_data_gb": (2, frozenset()),
    # Every evaluate@* depends on the whole evaluate section; the audit scores as evaluate does, and
    # compare reads evaluate.tta itself.
    "evaluate.tta": (["custom", "extract"], EVALUATE | {"shortcuts", "external", "compare"}),
    # Only the Grad-CAM gallery changes: predictions are byte-identical, so compare must not rerun.
    "evaluate.gradcam_per_class": (2, EVALUATE),
    # Split checks the groups CSV first and, with no unseen group, writes the same split (so audit stays put);
    # the training stages read the groups section (balance: group, select: worst_group) and, with the default
    # recipes, save byte-identical checkpoints (so shortcuts stays put); the evaluate stages check the CSV and
    # log its match rate (outputs byte-identical, so external stays put); compare writes the subgroup report.
    # The project fixture writes groups.csv.
    "groups.csv": ("groups.csv", frozenset({"split", "train@custom", "train@extract", "train@finetune", "train_probe"})
                   | EVALUATE | {"compare"}),
    # With groups.csv (set just above) one COVID19 and one NORMAL training file leave train and val, so
    # every stage that reads the split reruns.
    "split.unseen_groups": (["north"], FROM_SPLIT),
    # The probe's length retrains only the probe; the audit and the report follow.
    "shortcuts.probe_epochs": (2, frozenset({"train_probe", "shortcuts", "compare"})),
    # A verdict threshold: the audit reruns (its readings may change), no model is retrained.
    "shortcuts.flag_share": (0.6, frozenset({"shortcuts", "compare"})),
    # The comparison's bootstrap also sets the audit's intervals; nothing upstream changes.
    "compare.bootstrap_resamples": (200, frozenset({"shortcuts", "external", "compare"})),
}

_CACHED = re.compile(r"Stage '([^']+)' is cached")
_EDGE = re.compile(r'"([^"]+)" -> "([^"]+)"')


def _restored(log: str) -> set[str]:
    """Stages DVC restored from its run-cache instead of running them."""
    return set(_CACHED.findall(log))


def _set_param(project: Path, dotted: str, value: Any) -> Any:
    """Set ``section.key`` in the project's params.yaml; returns the old value."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    section, key = dotted.split(".")
    old = params[section][key]
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return old


def _status(project: Path) -> dict:
    """``dvc status --json``: the stages whose deps or params differ from dvc.lock, with what changed."""
    return json.loads(sh(project, "dvc", "status", "--json"))


def _with_followers(edges: list[tuple[str, str]], stages: set[str]) -> set[str]:
    """``stages`` and every stage after one of them along ``edges``: all that can rerun once they have."""
    reach, todo = set(stages), list(stages)
    while todo:
        stage = todo.pop()
        for after in {target for source, target in edges if source == stage} - reach:
            reach.add(after)
            todo.append(after)
    return reach


def _site(path: Path) -> str:
    """The fixture's collections: 'north' is the first COVID19 and the first NORMAL training file, 'south' the rest."""
    first = path.parent.parent.name == "train" and path == min(path.parent.glob("*.jp*g"))
    return "north" if first and path.parent.name in ("COVID19", "NORMAL") else "south"


@pytest.fixture(scope="module")
def project(reproduced_mini: Reproduced, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert ran_stages(reproduced_mini.log) == ALL_STAGES, reproduced_mini.log[-3000:]
    project = copy_project(reproduced_mini.project, tmp_path_factory.mktemp("rerun_scope") / "project")
    source = Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["source"])
    (project / "groups.csv").write_text("file,source_repo\n" + "".join(
        f"{path.relative_to(source).as_posix()},{_site(path)}\n" for path in sorted((source / "Data").rglob("*.jp*g"))))
    return project


@pytest.fixture(scope="module")
def edges(project: Path) -> list[tuple[str, str]]:
    """The pipeline's edges (stage, a stage that depends on it), as ``dvc dag`` draws them."""
    return _EDGE.findall(sh(project, "dvc", "dag", "--dot"))


def test_values_are_fresh(project: Path) -> None:
    """Each new value differs from the project's; a reused one could come back from the run-cache."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, (value, _) in EXPECTED_RERUNS.items():
        section, key = dotted.split(".")
        assert key in params[section], dotted
        assert params[section][key] != value, dotted


def test_the_stages_after_a_stage_come_from_dvc_dag(edges: list[tuple[str, str]]) -> None:
    """The control of the status checks below: the stages after a few, known from the pipeline's structure."""
    assert _with_followers(edges, set()) == set()
    assert _with_followers(edges, {"download"}) == ALL_STAGES
    assert _with_followers(edges, {"audit"}) == FROM_PREPROCESS | {"audit"}
    assert _with_followers(edges, {"train_probe"}) == {"train_probe", "shortcuts", "compare"}
    assert _with_followers(edges, {"evaluate@extract"}) == {"evaluate@extract", "external", "compare"}


@pytest.mark.parametrize("dotted", list(EXPECTED_RERUNS))
def test_param_change_reruns_exactly(project: Path, edges: list[tuple[str, str]], dotted: str) -> None:
    before = _status(project)
    assert before == {}, f"project not up to date before changing {dotted}: {before}"

    value, expected = EXPECTED_RERUNS[dotted]
    old = _set_param(project, dotted, value)
    assert old != value, f"{dotted}={value!r} is not a change"
    reading = set(_status(project))
    reach = _with_followers(edges, reading)
    by_status = expected == reach  # all that follows the stages that read the key reruns: DVC's cascade, not ours
    if by_status or not reading <= expected <= reach:
        _set_param(project, dotted, old)  # nothing ran: the project stays up to date for the next key
    assert reading <= expected <= reach, (
        f"{dotted}: {old!r} -> {value!r}\n"
        f"  reads the key but should not rerun: {sorted(reading - expected)}\n"
        f"  should rerun but neither reads the key nor comes after a stage that does: {sorted(expected - reach)}"
    )
    if by_status:
        return

    log = sh(project, "dvc", "repro")
    ran, restored = ran_stages(log), _restored(log)
    assert not restored, f"{dotted}: stages restored from the run-cache (value not fresh?): {sorted(restored)}"
    assert ran == set(expected), (
        f"{dotted}: {old!r} -> {value!r}\n"
        f"  ran but should not: {sorted(ran - expected)}\n"
        f"  should have run but did not: {sorted(expected - ran)}\n{log[-3000:]}"
    )


def _download_status(project: Path) -> dict:
    return json.loads(sh(project, "dvc", "status", "download", "--json"))


@pytest.mark.parametrize("module", ["src/cxr/data/images.py", "src/cxr/params.py"])
def test_an_edit_of_other_library_code_does_not_refetch_the_data(project: Path, module: str) -> None:
    """download depends on its fetching code only; the decoders and the params model are not among its deps."""
    path = project / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# edited\n")
        assert _download_status(project) == {}
    finally:
        path.write_bytes(original)


def test_an_edit_of_the_fetching_code_reruns_download(project: Path) -> None:
    """The control of the test above: the module that picks image files out of a class folder is a dep."""
    path = project / "src/cxr/data/candidates.py"
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# edited\n")
        assert _download_status(project) == {
            "download": [{"changed deps": {"src/cxr/data/candidates.py": "modified"}}]}
    finally:
        path.write_bytes(original)
