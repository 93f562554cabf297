"""Leave-one-collection-out table: each collection's test score when training never saw it, next to when it did.

A pooled or per-group score from one training run cannot say whether a model has learnt the
lungs or the collection: a collection it trained on shares scanners, processing and labelling
habits with its test films. Holding the collection out (``split.unseen_groups``) and scoring
the same test films again answers that; the drop is what a deployment at a new site should
expect to lose. The runs are ordinary DVC experiments (benchmarks/README.md has the queued
sweep), so this script only gathers them: ``dvc exp show --json`` for each run's params, and
``metrics/subgroups.json`` at each run's commit (a ``cache: false`` output, so it is in git).

For every finished run that holds collections out, each held-out collection gets one row. Its
*seen* score comes from the run with the same params in every other respect that trains on
the collection, preferring the one that holds out the fewest collections (the sweep's run
with ``split.unseen_groups: []``); the table names both runs. Queued, running and failed
experiments are left out, with a log line each.

``python benchmarks/leave_one_out.py [--model custom] [--collections NAME ...] [--out PATH]``
prints the table as markdown and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.approaches import DISPLAY_NAMES
from cxr.console import run
from cxr.errors import PipelineError, first_line

log = logging.getLogger("leave_one_out")

SUBGROUPS = "metrics/subgroups.json"
FINISHED = (None, "success")  # executor states of a finished experiment (None: run in the workspace, not queued)
ENTRY_KEYS = ("images", "accuracy", "sensitivity", "pneumonia_vs_normal_auc", "unseen")
SCORES = {  # row key: (column title, how to find the score in one group's entry of metrics/subgroups.json)
    "accuracy": ("Accuracy", lambda entry: entry["accuracy"]),
    "pneumonia_sensitivity": ("PNEUMONIA sensitivity", lambda entry: entry["sensitivity"].get("PNEUMONIA")),
    "pneumonia_vs_normal_auc": ("P vs N AUC", lambda entry: entry["pneumonia_vs_normal_auc"]),
}

FileReader = Callable[[str, str], str | None]
"""(git revision, path) -> the file's text at that revision, None where the revision has no such file."""


@dataclass(frozen=True)
class Run:
    """One finished training run: a baseline commit or an experiment on it."""

    name: str
    rev: str
    unseen: tuple[str, ...]
    others: str  # every other param (all params files, split.unseen_groups left out), as canonical JSON

    @property
    def label(self) -> str:
        return f"{self.name} ({self.rev[:7]})"


def _run(entry: Mapping[str, Any], name: str) -> Run:
    """A :class:`Run` from one revision entry of ``dvc exp show --json``."""
    params = {path: dict(item.get("data") or {}) for path, item in (entry["data"].get("params") or {}).items()}
    split = dict(params.get("params.yaml", {}).get("split") or {})
    unseen = tuple(split.pop("unseen_groups", None) or ())
    if "params.yaml" in params:
        params["params.yaml"]["split"] = split
    return Run(name, entry["rev"], unseen, json.dumps(params, sort_keys=True))


def finished_runs(shown: Sequence[Mapping[str, Any]]) -> list[list[Run]]:
    """Per baseline commit in ``dvc exp show --json`` output: the commit and its finished experiments.

    The workspace entry is skipped (it is no run's result). A queued experiment's revision is
    its stash of the workspace, so reading files there would give the baseline's; queued,
    running and failed ones are therefore logged and left out.
    """
    baselines = []
    for commit in shown:
        if commit["rev"] == "workspace" or commit.get("error") or not commit.get("data"):
            continue
        runs = [_run(commit, commit.get("name") or commit["rev"][:7])]
        for experiment in commit.get("experiments") or []:
            revision = experiment["revs"][0]
            state = (experiment.get("executor") or {}).get("state")
            name = experiment.get("name") or revision.get("name") or revision["rev"][:7]
            if state not in FINISHED or revision.get("error") or not revision.get("data"):
                log.info("left out: experiment %s (%s)", name, state or "error")
                continue
            runs.append(_run(revision, name))
        baselines.append(runs)
    if not any(len(runs) > 1 for runs in baselines):
        raise PipelineError("dvc exp show lists no finished experiment; run the sweep in benchmarks/README.md first")
    return baselines


class Reports:
    """Each run's ``metrics/subgroups.json`` for one model, read once; a missing or unreadable one is an error."""

    def __init__(self, read_file: FileReader, model: str) -> None:
        self.read_file, self.model, self.cache = read_file, model, {}

    def groups(self, run: Run) -> Mapping[str, Any]:
        """The model's groups in the run's report."""
        if run.rev not in self.cache:
            text = self.read_file(run.rev, SUBGROUPS)
            if text is None:
                raise PipelineError(f"experiment {run.label} has no {SUBGROUPS}; rerun it with this pipeline's compare stage")
            try:
                report = json.loads(text)
            except json.JSONDecodeError as err:
                raise PipelineError(f"experiment {run.label}: {SUBGROUPS} is not JSON ({first_line(err)})") from None
            if self.model not in report:
                raise PipelineError(f"experiment {run.label}: {SUBGROUPS} has no model {self.model!r} "
                                    f"(it has {sorted(report) or 'none: groups.csv was null'})")
            self.cache[run.rev] = report[self.model]["groups"]
        return self.cache[run.rev]

    def has_report(self, run: Run) -> bool:
        """Whether the run's revision holds the report at all."""
        return run.rev in self.cache or self.read_file(run.rev, SUBGROUPS) is not None

    def entry(self, run: Run, collection: str, unseen: bool) -> Mapping[str, Any]:
        """The collection's scores in ``run``, checked to be marked as held out (or not) as the run's params say."""
        entry = self.groups(run).get(collection)
        if entry is None:
            raise PipelineError(f"experiment {run.label}: {SUBGROUPS} has no test images of {collection!r}")
        absent = [key for key in ENTRY_KEYS if key not in entry]
        if absent:
            raise PipelineError(f"experiment {run.label}: {SUBGROUPS} has no {absent[0]!r} for {collection!r}; "
                                "an older compare wrote it, rerun the experiment")
        if entry["unseen"] != unseen:
            raise PipelineError(f"experiment {run.label}: {SUBGROUPS} marks {collection!r} as "
                                f"{'unseen' if entry['unseen'] else 'seen'}, its params say otherwise; rerun it")
        return entry


def _seen_run(runs: Sequence[Run], held_out: Run, collection: str, reports: Reports) -> Run | None:
    """The run with ``held_out``'s other params that trains on ``collection``, holding out the fewest collections.

    Among equals, one whose commit holds the report wins: a baseline commit with the sweep's params
    that was never reproduced has none, while its queued ``loo-all`` twin has.
    """
    candidates = [other for other in runs if other.others == held_out.others and collection not in other.unseen]
    return min(candidates, key=lambda other: (len(other.unseen), not reports.has_report(other)), default=None)


def _row(reports: Reports, collection: str, unseen_run: Run, seen_run: Run) -> dict[str, Any]:
    """One collection's scores unseen and seen, and the drop (seen minus unseen) of each."""
    unseen, seen = reports.entry(unseen_run, collection, True), reports.entry(seen_run, collection, False)
    if unseen["images"] != seen["images"]:
        raise PipelineError(f"{collection!r} has {unseen['images']} test images in {unseen_run.label} but "
                            f"{seen['images']} in {seen_run.label}: the runs scored different test sets")
    row = {"collection": collection, "images": unseen["images"], "unseen_run": unseen_run.name, "seen_run": seen_run.name,
           "unseen": {}, "seen": {}, "drop": {}}
    for key, (_, find) in SCORES.items():
        row["unseen"][key], row["seen"][key] = find(unseen), find(seen)
        both = row["unseen"][key] is not None and row["seen"][key] is not None
        row["drop"][key] = row["seen"][key]["value"] - row["unseen"][key]["value"] if both else None
    return row


def leave_one_out(shown: Sequence[Mapping[str, Any]], read_file: FileReader, model: str = "custom",
                  collections: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The table's rows: one per collection and finished run that holds it out, in collection order.

    ``shown`` is the parsed output of ``dvc exp show --json``; ``read_file`` reads a file at a
    revision (``git show`` in :func:`main`, a dictionary in the tests). With ``collections``,
    only those, and each must have a row; without, every collection some run holds out.
    """
    reports, rows, missing = Reports(read_file, model), [], {}
    for runs in finished_runs(shown):
        for held_out in runs:
            for collection in held_out.unseen:
                if collections is not None and collection not in collections:
                    continue
                seen = _seen_run(runs, held_out, collection, reports)
                if seen is None:
                    missing[collection] = f"no finished run with the params of {held_out.label} trains on it"
                elif collection not in reports.groups(held_out):
                    missing[collection] = f"no test images in {held_out.label}"
                else:
                    rows.append(_row(reports, collection, held_out, seen))
                    continue
                log.warning("%s, held out in %s: %s", collection, held_out.label, missing[collection])
    covered = {row["collection"] for row in rows}
    for collection in collections or ():
        if collection not in covered:
            reason = missing.get(collection, "no finished experiment holds it out (split.unseen_groups)")
            raise PipelineError(f"collection {collection!r}: {reason}")
    if not rows:
        raise PipelineError("no collection has an unseen and a seen run to compare: "
                            + ("; ".join(f"{name}: {why}" for name, why in missing.items()) or "no run holds one out"))
    return sorted(rows, key=lambda row: row["collection"])


def _cell(score: Mapping[str, float] | None) -> str:
    return "-" if score is None else f"{score['value']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}]"


def markdown(rows: Sequence[Mapping[str, Any]], model: str) -> str:
    """The rows as a markdown table: per score, unseen and seen with 95% intervals, then the drop."""
    header = ["Collection", "Test images", "Held out in", "Seen in"]
    for title, _ in SCORES.values():
        header += [f"{title} unseen", f"{title} seen", "Drop"]
    lines = [f"Leave-one-collection-out, {DISPLAY_NAMES.get(model, model)}: test scores with 95% bootstrap intervals; "
             "drop = seen - unseen (what the model loses on a collection it never trained on); - : undefined.", "",
             "| " + " | ".join(header) + " |", "|---|---:|---|---|" + "---|---|---:|" * len(SCORES)]
    for row in rows:
        cells = [row["collection"].replace("|", r"\|"), str(row["images"]), row["unseen_run"], row["seen_run"]]
        for key in SCORES:
            drop = row["drop"][key]
            cells += [_cell(row["unseen"][key]), _cell(row["seen"][key]), "-" if drop is None else f"{drop:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _command(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=project, capture_output=True, text=True, check=False)


def exp_show(project: Path) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of ``project``, parsed; a failure is one line with DVC's own reason."""
    done = _command(project, sys.executable, "-m", "dvc", "exp", "show", "--json")
    if done.returncode != 0:
        reason = next(iter(done.stderr.strip().splitlines()), f"exit status {done.returncode}")
        raise PipelineError(f"dvc exp show failed in {project}: {reason}")
    return json.loads(done.stdout)


def git_reader(project: Path) -> FileReader:
    """A :data:`FileReader` over ``git show REV:PATH`` in ``project``."""

    def read(rev: str, path: str) -> str | None:
        done = _command(project, "git", "show", f"{rev}:{path}")
        return done.stdout if done.returncode == 0 else None

    return read


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="the DVC project that ran the experiments")
    parser.add_argument("--model", default="custom", help="custom, extract, finetune or ensemble")
    parser.add_argument("--collections", nargs="+", help="only these collections; each must have been held out")
    parser.add_argument("--out", type=Path, default=Path("metrics/leave_one_out.json"))
    args = parser.parse_args(argv)
    rows = leave_one_out(exp_show(args.project), git_reader(args.project), args.model, args.collections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, args.model))
    return rows


if __name__ == "__main__":
    run(main)
