"""The bad-input corpus (issue 28): every user input known to have lost data, filled the disk or ended in a traceback.

Each case builds its tiny input here and goes through the entry point where users meet it
(``dvc repro``'s stage scripts run as subprocesses in a temporary project, ``cxr-predict``,
``load_params``, or the library call behind them where the case needs an injected fake such as
a local HTTP(S) server on 127.0.0.1), and expects the exact outcome: one line naming the file,
key or URL (or a skipped-file entry), exit status 1 and no traceback, the user's files as they
were, no work folder left behind, and memory and disk within the stated bounds.

Sections: sources (zips, folders, URLs: cases 1-5, 12, 13); images (cases 6-8, each one
ImageDecodeError line, skipped by preprocess and cxr-predict, bounded memory); checkpoints, the
``groups`` CSV and params.yaml (cases 9-11). The property-based fuzz of the decoder is
in tests/test_fuzz_decode.py.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import runpy
import shutil
import signal
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr.data import images
from cxr.data.download import fetch_dataset
from cxr.data.groups import load_groups, log_matches
from cxr.data.images import decode_grayscale
from cxr.data.preprocess import preprocess_split
from cxr.data.sources import PIPELINE_OUTPUTS, Source, SourceLimits, human_size
from cxr.data.split import index_split
from cxr.errors import ImageDecodeError, PipelineError
from cxr.evaluation.external_scoring import fetch_external, image_sizes, load_scorers
from cxr.evaluation.predictions import predictions_frame
from cxr.files import read_json
from cxr.params import GroupsParams, load_params
from cxr.predict import main as predict_main
from cxr.reporting.subgroups import subgroup_report, subgroups_markdown
from cxr.training.models import build_model

from conftest import CLASSES, make_kaggle_tree, make_kaggle_zip, write_processed
from test_pipeline import ROOT, _env

# === Sources: zips, folders and URLs (cases 1-5, 12, 13) ====================================================


HANDLE = "someone/chest-xray/versions/1"
NORMAL = "Data/train/NORMAL"


# --- helpers -------------------------------------------------------------------------------------------


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): a file's SHA-256, a link's target, else its kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                kind = f"link -> {os.readlink(path)}"
            elif stat.S_ISREG(mode):
                kind = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                kind = "folder" if stat.S_ISDIR(mode) else "other"
            found[path.relative_to(folder).as_posix()] = kind
    return found


def work_folders(project: Path) -> list[str]:
    """Work folders a fetch may have left: ``data/.raw-*`` and ``data/external/.<name>-*``."""
    found = []
    for folder, prefix in ((project / "data", ".raw-"), (project / "data" / "external", ".")):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith(prefix)]
    return sorted(found)


def make_project(tmp_path: Path, source: str = "kaggle", external: dict[str, str] | None = None) -> Path:
    """A project folder holding only params.yaml (the stage scripts run from the repository)."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = source
    params["external"] = external or {}
    params["train"].update(device="cpu", threads=1)
    params["evaluate"]["tta"] = []
    params["compare"]["bootstrap_resamples"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def run_stage(project: Path, stage: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=project, env={**_env(), **env},
                          capture_output=True, text=True, timeout=300)


def assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1, and stderr is exactly the one line ``error: <message>`` (so no traceback either)."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"error: {message}"]


def set_member_flag(archive: Path, member: str, bit: int) -> None:
    """Set a general-purpose flag bit of ``member`` in its local header and its central directory entry."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    raw = bytearray(archive.read_bytes())
    raw[info.header_offset + 6] |= bit
    position = int.from_bytes(raw[-6:-2], "little")  # end record (no comment): offset of the central directory
    while raw[position:position + 4] == b"PK\x01\x02":
        lengths = [int.from_bytes(raw[position + i:position + i + 2], "little") for i in (28, 30, 32)]
        if raw[position + 46:position + 46 + lengths[0]] == member.encode():
            raw[position + 8] |= bit
        position += 46 + sum(lengths)
    archive.write_bytes(bytes(raw))


def deflate_bomb(path: Path, member: str, mebibytes: int) -> Path:
    """A zip of one member that unpacks to ``mebibytes`` MiB of zeros, about 1 KiB packed per MiB.

    Written by hand (one deflate block repeated after full flushes) so a 1 GiB bomb takes well under a second.
    """
    block = bytes(2**20)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = squeeze.compress(block) + squeeze.flush(zlib.Z_FULL_FLUSH)
    again = squeeze.compress(block) + squeeze.flush(zlib.Z_FULL_FLUSH)
    data = first + again * (mebibytes - 1) + squeeze.flush()
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(block, crc)
    name, size = member.encode(), mebibytes * 2**20
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    return path


def user_zip(tmp_path: Path, top_folder: str | None = None) -> Path:
    """A valid Kaggle zip outside the project, under ``tmp/user``."""
    (tmp_path / "user").mkdir(exist_ok=True)
    return make_kaggle_zip(tmp_path / "user", top_folder=top_folder)


def with_members(tmp_path: Path, *members: tuple[str | zipfile.ZipInfo, bytes]) -> Path:
    """A valid Kaggle zip with ``members`` added, so a refusal comes from them and not from the layout."""
    archive = user_zip(tmp_path)
    with zipfile.ZipFile(archive, "a") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return archive


def user_tree(tmp_path: Path) -> Path:
    """A valid folder source outside the project: ``tmp/user/set`` holding ``Data/{train,test}/<class>/``."""
    return make_kaggle_tree(tmp_path / "user" / "set", per_class=1).parent


# --- the download stage: local sources -----------------------------------------------------------------


def _bomb_message(archive: Path, member: str) -> str:
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    return (f"{archive}: member {member} unpacks {info.file_size / info.compress_size:,.0f}x ({human_size(info.compress_size)} "
            f"to {human_size(info.file_size)}), above the 100x allowed: a decompression bomb")


def _zip_bomb(tmp_path: Path, project: Path) -> tuple[str, str]:
    """The issue's case: 32 KB that unpacks to 31 MB (987x)."""
    archive = with_members(tmp_path)
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(f"{NORMAL}/bomb.png", bytes(31 * 2**20))
    return str(archive), _bomb_message(archive, f"{NORMAL}/bomb.png")


def _encrypted(tmp_path: Path, project: Path) -> tuple[str, str]:
    archive = with_members(tmp_path, (f"{NORMAL}/secret.jpeg", b"\xff\xd8 scrambled"))
    set_member_flag(archive, f"{NORMAL}/secret.jpeg", 0x1)
    return str(archive), f"{archive}: member {NORMAL}/secret.jpeg is encrypted; unzip it with its password and use the folder"


def _file_where_a_folder_is_needed(tmp_path: Path, project: Path) -> tuple[str, str]:
    archive = with_members(tmp_path, (f"{NORMAL}/a.png", b"png"), (f"{NORMAL}/a.png/inner.png", b"png"))
    return str(archive), (f"{archive}: member {NORMAL}/a.png/inner.png needs a folder {NORMAL}/a.png, but member "
                          f"{NORMAL}/a.png is a file of that name")


def _member_twice(tmp_path: Path, project: Path) -> tuple[str, str]:
    archive = with_members(tmp_path, (f"{NORMAL}/twice.png", b"one"))
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(f"{NORMAL}/twice.png", b"two")
    return str(archive), f"{archive}: member {NORMAL}/twice.png appears twice; keep one copy"


def _escaping_member(name: str) -> Callable[[Path, Path], tuple[str, str]]:
    def build(tmp_path: Path, project: Path) -> tuple[str, str]:
        archive = with_members(tmp_path, (name, b"overwrite me"))
        return str(archive), (f"{archive}: member {name} would be written outside the folder it is unpacked into (an "
                              "absolute path or ..); refusing the zip")
    return build


def _symlink_member(tmp_path: Path, project: Path) -> tuple[str, str]:
    link = zipfile.ZipInfo(f"{NORMAL}/link.jpeg")
    link.create_system = 3  # Unix, so the mode in external_attr counts
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = with_members(tmp_path, (link, b"/etc/passwd"))
    return str(archive), f"{archive}: member {NORMAL}/link.jpeg is a symbolic link; zip the files it points to instead"


def _dangling_link(tmp_path: Path, project: Path) -> tuple[str, str]:
    source = user_tree(tmp_path)
    (source / NORMAL / "gone.jpeg").symlink_to("moved-away.jpeg")
    return str(source), (f"data.source: symbolic link {source}/{NORMAL}/gone.jpeg is broken (its target moved-away.jpeg "
                         "does not exist)")


def _link_to_an_ancestor(tmp_path: Path, project: Path) -> tuple[str, str]:
    source = user_tree(tmp_path)
    (source / "Data" / "train" / "loop").symlink_to("..")
    return str(source), f"data.source: symbolic link {source}/Data/train/loop leads back to a folder that holds it, a loop"


def _link_to_itself(tmp_path: Path, project: Path) -> tuple[str, str]:
    source = user_tree(tmp_path)
    (source / NORMAL / "self.jpeg").symlink_to("self.jpeg")
    return str(source), f"data.source: symbolic link {source}/{NORMAL}/self.jpeg loops (it leads back to itself)"


def _link_outside(tmp_path: Path, project: Path) -> tuple[str, str]:
    source = user_tree(tmp_path)
    secret = tmp_path / "user" / "secret.txt"  # stands for a system file such as /etc/shadow
    secret.write_text("not for the data set")
    (source / NORMAL / "x.jpeg").symlink_to(secret)
    return str(source), (f"data.source: symbolic link {source}/{NORMAL}/x.jpeg leads outside the source folder (to {secret}); "
                         "copy the file in instead")


def _fifo(tmp_path: Path, project: Path) -> tuple[str, str]:
    source = user_tree(tmp_path)
    os.mkfifo(source / NORMAL / "pipe.jpeg")  # copying it would block forever
    return str(source), f"data.source: {source}/{NORMAL}/pipe.jpeg is neither a file nor a folder (a FIFO, socket or device)"


def _inside(relative: str) -> Callable[[Path, Path], tuple[str, str]]:
    """A set the user keeps inside one of the pipeline's output folders (deleted when that stage runs)."""
    def build(tmp_path: Path, project: Path) -> tuple[str, str]:
        make_kaggle_tree(project / relative, per_class=1)
        top = Path(relative).parts[0] if Path(relative).parts[0] != "data" else "/".join(Path(relative).parts[:2])
        return relative, (f"data.source {relative!r} is inside {top}/, which the pipeline clears and rewrites; move the "
                          "data set out of the project's output folders")
    return build


def _link_into_outputs(tmp_path: Path, project: Path) -> tuple[str, str]:
    make_kaggle_tree(project / "data" / "processed" / "mine", per_class=1)
    link = tmp_path / "user" / "looks-outside"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(project / "data" / "processed" / "mine")
    return str(link), (f"data.source {str(link)!r} is inside data/processed/, which the pipeline clears and rewrites; move "
                       "the data set out of the project's output folders")


def _in_a_work_folder(tmp_path: Path, project: Path) -> tuple[str, str]:
    make_kaggle_tree(project / "data" / ".raw-0123abcd", per_class=1)
    return "data/.raw-0123abcd", ("data.source 'data/.raw-0123abcd' is inside a temporary folder of the pipeline, removed "
                                  "at the next fetch")


def _holds_the_destination(value: Callable[[Path, Path], str]) -> Callable[[Path, Path], tuple[str, str]]:
    def build(tmp_path: Path, project: Path) -> tuple[str, str]:
        source = value(tmp_path, project)
        return source, (f"data.source {source!r} holds data/raw, where the data is installed; point it at the data set's "
                        "own folder or .zip")
    return build


def _fixed(source: str, message: str) -> Callable[[Path, Path], tuple[str, str]]:
    return lambda tmp_path, project: (source, message)


DOWNLOAD_CASES = [
    pytest.param(_fixed("", "data.source is empty; use kaggle, a .zip, a folder or an https URL"), id="empty"),
    pytest.param(_holds_the_destination(lambda tmp, project: "."), id="dot"),
    pytest.param(_holds_the_destination(lambda tmp, project: "~"), id="home"),
    pytest.param(_holds_the_destination(lambda tmp, project: str(project)), id="project-root"),
    pytest.param(_holds_the_destination(lambda tmp, project: (project / "data").mkdir() or "data"), id="data-folder"),
    pytest.param(_inside("data/processed/mine"), id="inside-data-processed"),
    pytest.param(_inside("data/raw/Data"), id="inside-data-raw"),
    pytest.param(_inside("models/chest"), id="inside-models"),
    pytest.param(_link_into_outputs, id="link-into-outputs"),
    pytest.param(_in_a_work_folder, id="inside-a-work-folder"),
    pytest.param(_zip_bomb, id="zip-bomb-987x"),
    pytest.param(_encrypted, id="zip-encrypted-member"),
    pytest.param(_file_where_a_folder_is_needed, id="zip-member-through-a-file"),
    pytest.param(_member_twice, id="zip-member-twice"),
    pytest.param(_escaping_member("/tmp/evil.png"), id="zip-absolute-member"),
    pytest.param(_escaping_member("Data/../../evil.png"), id="zip-dotdot-member"),
    pytest.param(_symlink_member, id="zip-symlink-member"),
    pytest.param(_dangling_link, id="folder-dangling-link"),
    pytest.param(_link_to_an_ancestor, id="folder-dotdot-loop"),
    pytest.param(_link_to_itself, id="folder-self-loop"),
    pytest.param(_link_outside, id="folder-link-outside"),
    pytest.param(_fifo, id="folder-fifo"),
    pytest.param(_fixed("http://example.org/chest.zip", "data.source 'http://example.org/chest.zip': plain http can be "
                 "altered on the way; use https, or pin the file with #sha256=<its 64 hex digits> at the end of the URL"),
                 id="http-without-sha256"),
    pytest.param(_fixed("http://alice:hunter2@example.org/chest.zip?token=s3cr3t-t0ken",
                        "data.source 'http://***@example.org/chest.zip?token=***': plain http can be altered on the way; "
                        "use https, or pin the file with #sha256=<its 64 hex digits> at the end of the URL"),
                 id="http-with-credentials"),
    pytest.param(_fixed("https://example.org/chest.zip#sha256=abc", "data.source 'https://example.org/chest.zip#sha256=abc': "
                        "the part after # must be sha256=<64 hex digits> (the file's SHA-256)"), id="malformed-pin"),
    pytest.param(_fixed("https://example.org:99999/chest.zip", "data.source: not a valid URL (Port out of range 0-65535)"),
                 id="url-port-out-of-range"),
    pytest.param(_fixed("ftp://example.org/chest.zip", "data.source 'ftp://example.org/chest.zip': unsupported URL scheme "
                        "ftp:// (use an https URL, or download the file and give its path)"), id="ftp"),
    pytest.param(_fixed("owner/chest-xray", "data.source 'owner/chest-xray': no such file or folder (use kaggle, a .zip, "
                        "a folder or an https URL)"), id="missing-path"),
]


@pytest.mark.parametrize("build", DOWNLOAD_CASES)
def test_the_download_stage_refuses_a_bad_source_with_one_line_and_touches_nothing(tmp_path, build):
    project = make_project(tmp_path)
    source, message = build(tmp_path, project)
    make_project(tmp_path, source)
    before, users_own = fingerprint(tmp_path), work_folders(project)  # inside-a-work-folder: the user's set, kept

    done = run_stage(project, "download", HOME=str(tmp_path))

    assert_refused(done, message)
    after = fingerprint(tmp_path)
    assert {k: v for k, v in after.items() if v != "folder"} == {k: v for k, v in before.items() if v != "folder"}
    assert set(before) - set(after) == set()  # no folder of the user's removed either
    assert work_folders(project) == users_own


def test_every_output_folder_of_dvc_yaml_is_protected():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(out)) if isinstance(out, dict) else out
            for stage in stages.values() for section in ("outs", "metrics", "plots")
            for out in (stage.get("do", stage).get(section) or [])]
    protected = {folder.as_posix() for folder in PIPELINE_OUTPUTS}
    unprotected = [out for out in outs if not any(out == p or out.startswith(f"{p}/") for p in protected)]
    assert unprotected == []


BOMB_MEBIBYTES = 1024
WRITE_LIMIT = 16 * 2**20  # the stage may write at most this much per file: the bomb's member is 64x bigger
MEMORY_BOUND = 512 * 2**20  # peak resident memory of the whole stage: half of what the bomb unpacks to

# Runs a stage script with RLIMIT_FSIZE set and, at exit, writes its own peak resident memory (VmHWM, KiB) to
# argv[1]. A forked child's ru_maxrss would count the parent's (pytest's) pages from before exec.
LIMITED_STAGE = f"""
import atexit, resource, runpy, sys
def peak(path=sys.argv[1]):
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(kib)
atexit.register(peak)
resource.setrlimit(resource.RLIMIT_FSIZE, ({WRITE_LIMIT}, {WRITE_LIMIT}))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_zip_bomb_is_refused_before_its_member_is_written_or_read_into_memory(tmp_path):
    (tmp_path / "user").mkdir()
    archive = deflate_bomb(tmp_path / "user" / "bomb.zip", f"{NORMAL}/bomb.png", BOMB_MEBIBYTES)
    project = make_project(tmp_path, str(archive))

    done = subprocess.run([sys.executable, "-c", LIMITED_STAGE, str(tmp_path / "peak"), str(ROOT / "stages" / "download.py")],
                          cwd=project, env=_env(), capture_output=True, text=True, timeout=300)

    # a write past the limit fails with EFBIG (Python ignores SIGXFSZ), which would end the stage with another line
    assert_refused(done, _bomb_message(archive, f"{NORMAL}/bomb.png"))
    assert int((tmp_path / "peak").read_text()) * 1024 < MEMORY_BOUND
    assert work_folders(project) == [] and not (project / "data" / "raw").exists()


# --- the external stage --------------------------------------------------------------------------------


def _previous_outputs(project: Path) -> None:
    """What an earlier external run left, plus the user's own set kept (wrongly) inside data/external."""
    make_kaggle_tree(project / "data" / "external" / "nih", per_class=1)
    (project / "metrics" / "external").mkdir(parents=True)
    (project / "metrics" / "external" / "index.json").write_text('{"sets": {}}\n')
    (project / "metrics" / "external" / "nih.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip


EXTERNAL_CASES = [
    pytest.param({"good": "ZIP", "nih": "data/external/nih"},
                 "external.nih 'data/external/nih' is inside data/external/, which the pipeline clears and rewrites; move "
                 "the data set out of the project's output folders", id="inside-data-external"),
    pytest.param({"nih": "metrics/external/nih.zip"},
                 "external.nih 'metrics/external/nih.zip' is inside metrics/, which the pipeline clears and rewrites; move "
                 "the data set out of the project's output folders", id="inside-metrics"),
    pytest.param({"good": "ZIP", "nih": "someone/chest-xrays"},
                 "external.nih 'someone/chest-xrays': no such file or folder (for a Kaggle data set write "
                 "kaggle:someone/chest-xrays; use kaggle:owner/dataset, a .zip, a folder or an https URL)",
                 id="owner-name-is-not-sent-to-kaggle"),
]


@pytest.mark.parametrize(("sets", "message"), EXTERNAL_CASES)
def test_the_external_stage_checks_every_source_before_clearing_anything(tmp_path, sets, message):
    good = user_zip(tmp_path)
    project = make_project(tmp_path, external={name: str(good) if source == "ZIP" else source for name, source in sets.items()})
    _previous_outputs(project)
    before = fingerprint(tmp_path)

    done = run_stage(project, "external")

    assert_refused(done, message)
    assert fingerprint(tmp_path) == before  # data/external/nih and the old metrics are still there
    assert work_folders(project) == []


@pytest.mark.parametrize(("source", "message"), [
    pytest.param("someone/chest-xrays", "external.nih 'someone/chest-xrays': no such file or folder (for a Kaggle data set "
                 "write kaggle:someone/chest-xrays; use kaggle:owner/dataset, a .zip, a folder or an https URL)",
                 id="owner-name"),
    pytest.param("kaggle:someone", "external.nih 'kaggle:someone': not a Kaggle handle; write kaggle:owner/dataset or "
                 "kaggle:owner/dataset/versions/N", id="malformed-kaggle-handle"),
    pytest.param("kaggle", "external.nih is 'kaggle'; write the Kaggle data set as kaggle:owner/dataset (or "
                 "kaggle:owner/dataset/versions/N)", id="bare-kaggle"),
    pytest.param("", "external.nih is empty; use kaggle:owner/dataset, a .zip, a folder or an https URL", id="empty"),
    pytest.param("PROJECT", "external.nih 'PROJECT' holds PROJECT/data/external/nih, where the data is installed; point it "
                 "at the data set's own folder or .zip", id="project-root"),
])
def test_an_external_source_is_refused_before_any_kaggle_call_or_write(tmp_path, source, message):
    project = tmp_path / "project"
    project.mkdir()
    source, message = source.replace("PROJECT", str(project)), message.replace("PROJECT", str(project))

    def kaggle(handle: str, workdir: Path) -> Path:
        raise AssertionError(f"Kaggle was asked for {handle}")

    with pytest.raises(PipelineError) as excinfo:
        fetch_external("nih", source, CLASSES, project / "data" / "external" / "nih", kaggle=kaggle)

    assert str(excinfo.value) == message
    assert fingerprint(project) == {}


# --- stale work folders and the atomic install ---------------------------------------------------------


def test_a_work_folder_left_by_a_killed_download_is_removed_by_the_next_one(tmp_path, http_server):
    served = user_zip(tmp_path)
    http_server.routes["/slow.zip"] = trickle
    project = make_project(tmp_path, f"{http_server.base}/slow.zip#sha256={'0' * 64}")
    child = subprocess.Popen([sys.executable, str(ROOT / "stages" / "download.py")], cwd=project, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not work_folders(project) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(work_folders(project)) == 1

    make_project(tmp_path, str(served))
    done = run_stage(project, "download")

    assert done.returncode == 0, done.stderr
    assert work_folders(project) == []
    assert sorted(p.name for p in (project / "data" / "raw").iterdir()) == ["test", "train"]


def test_old_data_moved_aside_by_a_killed_install_is_put_back_before_a_failing_fetch(tmp_path):
    """A run killed between its two renames leaves no data/raw, and the old data in its work folder."""
    broken = make_kaggle_tree(tmp_path / "user" / "broken", per_class=1, splits=("train",))
    project = make_project(tmp_path, str(broken.parent))
    aside = project / "data" / ".raw-89abcdef" / "previous"
    aside.parent.mkdir(parents=True)
    shutil.move(make_kaggle_tree(tmp_path / "old", per_class=1), aside)  # data/.raw-89abcdef/previous/{train,test}
    old = fingerprint(aside)

    done = run_stage(project, "download")

    assert_refused(done, f"{broken}: missing folder test/ (expected train, test)")
    assert fingerprint(project / "data" / "raw") == old
    assert work_folders(project) == []


def test_a_stale_work_folder_of_an_external_set_is_removed(tmp_path):
    destination = tmp_path / "data" / "external" / "elsewhere"
    stale = destination.parent / ".elsewhere-0123abcd"
    stale.mkdir(parents=True)
    (stale / "download.zip").write_bytes(b"half a download")
    other = destination.parent / ".elsewhere-b-0123abcd"  # another set's (elsewhere-b) work folder is not touched
    other.mkdir()

    fetch_external("elsewhere", str(make_kaggle_zip(tmp_path)), CLASSES, destination)

    assert sorted(p.name for p in destination.parent.iterdir()) == [".elsewhere-b-0123abcd", "elsewhere"]


# --- in-process: caps that need small limits, and the free-disk check ----------------------------------


def refused(destination: Path, source: str, **kwargs) -> str:
    """Fetch ``source`` in-process; expect one line, nothing installed or left behind."""
    before = fingerprint(destination) if destination.exists() else None
    with pytest.raises(PipelineError) as excinfo:
        fetch_dataset(source, HANDLE, CLASSES, destination, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    assert (fingerprint(destination) if destination.exists() else None) == before
    assert not destination.parent.exists() or not [p for p in destination.parent.iterdir() if p.name.startswith(".raw-")]
    return message


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    return tmp_path / "project" / "data" / "raw"


def test_a_zip_with_more_members_than_allowed_is_refused(kaggle_zip, destination):
    message = refused(destination, str(kaggle_zip), limits=SourceLimits(max_entries=20))

    assert message == f"{kaggle_zip}: 24 members, more than the 20 allowed (far more files than a chest film set holds)"


def test_a_zip_whose_table_of_contents_is_oversized_is_refused_before_it_is_read(tmp_path, destination):
    archive = tmp_path / "padded.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo(f"{NORMAL}/a.png")
        info.comment = b"x" * 5000  # each member's directory entry may carry up to 64 KiB of comment
        zf.writestr(info, b"png")

    message = refused(destination, str(archive), limits=SourceLimits(max_entries=2))

    assert message == f"{archive}: its table of contents takes 5.0 KiB, more than 2 members need; not a zip to unpack"


def test_a_zip_that_unpacks_past_the_size_cap_is_refused(kaggle_zip, destination):
    with zipfile.ZipFile(kaggle_zip) as zf:
        total = sum(info.file_size for info in zf.infolist())

    message = refused(destination, str(kaggle_zip), limits=SourceLimits(max_bytes=total - 1))

    assert message == (f"{kaggle_zip}: unpacks to {human_size(total)}, more than the {human_size(total - 1)} allowed (a "
                       "decompression bomb, or not a chest film set)")


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_a_source_larger_than_the_free_disk_is_refused_before_writing(tmp_path, destination, monkeypatch, kind):
    source = make_kaggle_zip(tmp_path) if kind == "zip" else make_kaggle_tree(tmp_path / "tree").parent
    free = shutil.disk_usage(tmp_path)._replace(free=2**30 + 100)  # 100 bytes beyond the 1 GiB kept spare
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)

    message = refused(destination, str(source))

    what = str(source) if kind == "zip" else f"data.source {str(source)!r}"
    assert message.startswith(f"{what} needs ")
    assert message.endswith(f" on disk, but {destination.parent} has 1.0 GiB free (and 1.0 GiB is kept spare); free some space")


# --- URLs: local HTTP and HTTPS servers ----------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a trickling handler must not hold up the test's teardown


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path](handler)``; 404 for other paths. Records each request's path and credentials."""

    def do_GET(self) -> None:
        self.server.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        route = self.server.routes.get(urlsplit(self.path).path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    def log_message(self, *args) -> None:
        pass


def body(data: bytes, content_type: str = "application/zip", length: int | None = None) -> Callable:
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data) if length is None else length))
        handler.end_headers()
        handler.wfile.write(data)
    return route


def redirect(location: str) -> Callable:
    def route(handler: _Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def trickle(handler: _Handler) -> None:
    """A byte every 0.2 s of a promised megabyte: each read succeeds, so a per-read timeout never fires."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/zip")
    handler.send_header("Content-Length", str(2**20))
    handler.end_headers()
    for _ in range(600):
        handler.wfile.write(b"P")
        handler.wfile.flush()
        time.sleep(0.2)


def endless(handler: _Handler) -> None:
    """A body with no Content-Length that goes on (64 MiB) until the client hangs up."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/zip")
    handler.end_headers()
    block = bytes(2**16)
    for _ in range(1024):
        handler.wfile.write(block)


@contextmanager
def serving(context: ssl.SSLContext | None = None) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.routes, server.seen = {}, []
    server.base = f"{'https' if context else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_server() -> Iterator[_Server]:
    with serving() as server:
        yield server


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def https_server(certificate, monkeypatch) -> Iterator[_Server]:
    """An HTTPS server on 127.0.0.1 that requests trusts (through REQUESTS_CA_BUNDLE) in this process."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    with serving(context) as server:
        yield server


def test_an_upper_case_https_url_is_downloaded(kaggle_zip, destination, https_server):
    https_server.routes["/chest.zip"] = body(kaggle_zip.read_bytes())

    fetch_dataset(f"HTTPS://127.0.0.1:{https_server.base.rsplit(':', 1)[1]}/chest.zip", HANDLE, CLASSES, destination)

    assert sorted(p.name for p in destination.iterdir()) == ["test", "train"]


def test_a_redirect_from_https_to_http_is_refused(kaggle_zip, destination, https_server, http_server):
    http_server.routes["/chest.zip"] = body(kaggle_zip.read_bytes())
    https_server.routes["/chest.zip"] = redirect(f"{http_server.base}/chest.zip")

    message = refused(destination, f"{https_server.base}/chest.zip")

    assert message == (f"cannot download {https_server.base}/chest.zip: the server redirected from https to plain http "
                       f"({http_server.base}/chest.zip); refusing the downgrade")
    assert http_server.seen == []


def test_endless_redirects_are_cut_short(destination, https_server):
    https_server.routes["/a.zip"] = redirect("/b.zip")
    https_server.routes["/b.zip"] = redirect("/a.zip")

    message = refused(destination, f"{https_server.base}/a.zip")

    assert message == f"cannot download {https_server.base}/a.zip: more than 10 redirects"


def test_a_trickling_server_is_given_up_at_the_total_deadline(destination, https_server):
    https_server.routes["/slow.zip"] = trickle
    started = time.monotonic()

    message = refused(destination, f"{https_server.base}/slow.zip", limits=SourceLimits(deadline_s=1.5))

    assert message == (f"cannot download {https_server.base}/slow.zip: not complete after 1.5 s (the server is too slow or "
                       "stalled); download it by hand and point data.source at the .zip")
    assert time.monotonic() - started < 1.5 + 6


def test_a_body_past_the_byte_cap_is_cut_off(destination, https_server):
    https_server.routes["/big.zip"] = endless

    message = refused(destination, f"{https_server.base}/big.zip", limits=SourceLimits(max_bytes=2**20))

    assert message == f"cannot download {https_server.base}/big.zip: more than the 1.0 MiB allowed arrived"


def test_an_announced_size_past_the_cap_is_refused_before_the_body(destination, https_server):
    https_server.routes["/huge.zip"] = body(b"", length=2**40)

    message = refused(destination, f"{https_server.base}/huge.zip")

    assert message == (f"cannot download {https_server.base}/huge.zip: the server announces 1024.0 GiB, more than the 64.0 GiB "
                       "allowed")


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_an_html_page_is_named_as_such_with_the_url(destination, https_server, content_type):
    https_server.routes["/chest.zip"] = body(b"\n<!DOCTYPE html><html><body>Please sign in</body></html>", content_type)

    message = refused(destination, f"{https_server.base}/chest.zip")

    assert message == (f"cannot download {https_server.base}/chest.zip: the server sent an HTML page, not a zip (a login or "
                       "error page? use a direct download link)")


def test_a_file_that_does_not_match_its_pin_is_refused(kaggle_zip, destination, https_server):
    https_server.routes["/chest.zip"] = body(kaggle_zip.read_bytes())
    pin = "ab" * 32

    message = refused(destination, f"{https_server.base}/chest.zip#sha256={pin}")

    actual = hashlib.sha256(kaggle_zip.read_bytes()).hexdigest()
    assert message == (f"cannot download {https_server.base}/chest.zip#sha256={pin}: its sha256 is {actual}, not the {pin} "
                       "pinned in the URL (the file changed on the server, or was altered on the way)")


def test_an_untrusted_certificate_is_refused(destination, https_server, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    https_server.routes["/chest.zip"] = body(b"PK")

    message = refused(destination, f"{https_server.base}/chest.zip")

    assert message.startswith(f"cannot download {https_server.base}/chest.zip: the TLS certificate check failed (")


def test_a_not_a_zip_download_names_the_url_not_a_temporary_path(destination, https_server):
    https_server.routes["/chest.zip"] = body(b"plain text, not a zip", "application/zip")

    message = refused(destination, f"{https_server.base}/chest.zip")

    assert message == f"{https_server.base}/chest.zip is not a valid zip file (File is not a zip file)"


SECRET_URL_PARTS = ("hunter2", "s3cr3t-t0ken")


def test_credentials_in_a_url_are_used_but_never_shown(destination, https_server):
    https_server.routes["/private.zip"] = lambda handler: handler.send_error(403)
    url = f"https://alice:hunter2@{https_server.base.split('://')[1]}/private.zip?token=s3cr3t-t0ken&dl=1"

    message = refused(destination, url)

    assert message == (f"cannot download https://***@{https_server.base.split('://')[1]}/private.zip?token=***&dl=***: HTTP "
                       "Error 403: Forbidden (the link needs a login: use one that downloads without it, or download by hand)")
    assert https_server.seen[0]["authorization"] == "Basic " + base64.b64encode(b"alice:hunter2").decode()


@pytest.mark.parametrize(("url", "shown"), [
    ("https://alice:hunter2@host.org/x.zip", "https://***@host.org/x.zip"),
    ("https://host.org/x.zip?X-Amz-Signature=abc123&X-Amz-Expires=60", "https://host.org/x.zip?X-Amz-Signature=***&X-Amz-Expires=***"),
    ("https://host.org/x.zip?bare-token-123", "https://host.org/x.zip?***"),
    (f"https://host.org/x.zip#sha256={'a' * 64}", f"https://host.org/x.zip#sha256={'a' * 64}"),
])
def test_a_url_is_shown_without_credentials_or_query_values(url, shown):
    assert Source("url", "data.source", url).shown == shown


def test_credentials_never_reach_a_connection_error(destination):
    with serving() as server:
        port = server.server_address[1]
    url = f"https://alice:hunter2@127.0.0.1:{port}/x.zip?token=s3cr3t-t0ken"

    message = refused(destination, url)

    assert message == f"cannot download https://***@127.0.0.1:{port}/x.zip?token=***: Connection refused"


def _write_trained_project(project: Path) -> None:
    """Tiny untrained checkpoints and the internal predictions the external stage reads."""
    from test_external import write_checkpoint

    (project / "models").mkdir()
    for seed, approach in enumerate(("custom", "extract", "finetune")):
        write_checkpoint(project / "models" / f"{approach}.pt", approach, 32, seed)
        rng = np.random.default_rng(seed)
        labels = np.arange(12) % 3
        frame = predictions_frame([f"{i}.jpg" for i in range(12)], labels, rng.dirichlet(np.ones(3), 12), CLASSES)
        for folder in (project / "metrics" / "predictions", project / "data" / "val_predictions"):
            folder.mkdir(parents=True, exist_ok=True)
            frame.to_csv(folder / f"{approach}.csv", index=False)


def test_the_external_stage_writes_a_url_without_its_credentials(tmp_path, https_server, certificate):
    served = user_zip(tmp_path, top_folder="archive")
    https_server.routes["/set.zip"] = body(served.read_bytes())
    host = https_server.base.split("://")[1]
    project = make_project(tmp_path, external={"remote": f"https://alice:hunter2@{host}/set.zip?token=s3cr3t-t0ken"})
    _write_trained_project(project)

    done = run_stage(project, "external", REQUESTS_CA_BUNDLE=str(certificate[0]))

    assert done.returncode == 0, done.stderr
    shown = f"https://***@{host}/set.zip?token=***"
    assert read_json(project / "metrics" / "external" / "index.json")["sets"]["remote"]["source"] == shown
    assert read_json(project / "metrics" / "external" / "remote.json")["source"] == shown
    for path in [*(project / "metrics").rglob("*"), *(project / "data" / "external").rglob("*")]:
        if path.is_file():
            assert not any(secret.encode() in path.read_bytes() for secret in SECRET_URL_PARTS), path
    assert not any(secret in done.stdout + done.stderr for secret in SECRET_URL_PARTS)


# === Images: one bad file never stops a run (cases 6-8) =====================================================


SIZE = 32
TEXT_LIMIT = "a metadata chunk over PIL's limit (PngImagePlugin.MAX_TEXT_CHUNK = 1,048,576 bytes decompressed)"
NON_FINITE = "image has NaN or infinite pixel values (PIL mode F)"


# --- tiny files -------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(extra: bytes = b"", header: bytes | None = None) -> bytes:
    """A valid 4x4 8-bit grey PNG; ``extra`` chunks go between IHDR and IDAT; ``header`` replaces IHDR's data."""
    header = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0) if header is None else header
    rows = b"".join(b"\x00" + bytes([60, 60, 200, 200]) for _ in range(4))
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra
        + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    )


def _big_compressed_text() -> bytes:
    return zlib.compress(b"a" * (2 * 1024 * 1024))  # 2 MB of text in a few KB


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                  syntax: str = ExplicitVRLittleEndian) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.set_pixel_data(pixels, photometric, bits_stored)
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    return dataset


def dicom_bytes(edit: Callable[[Dataset], object] = lambda dataset: None, **kwargs) -> bytes:
    """A valid 4x4 DICOM file (``dicom_dataset(**kwargs)``), after ``edit`` changed its header."""
    pixels = kwargs.pop("pixels", np.arange(16, dtype=np.uint16).reshape(4, 4) * 200)
    dataset = dicom_dataset(pixels, **kwargs)
    edit(dataset)
    stream = BytesIO()
    dataset.save_as(stream, enforce_file_format=True)
    return stream.getvalue()


def _set(**elements) -> Callable[[Dataset], None]:
    def edit(dataset: Dataset) -> None:
        for keyword, value in elements.items():
            if value is None:
                del dataset[keyword]
            else:
                setattr(dataset, keyword, value)

    return edit


def _empty(keyword: str) -> Callable[[Dataset], None]:
    def edit(dataset: Dataset) -> None:
        dataset[keyword].value = None

    return edit


def _number_of_frames_abc() -> bytes:
    """NumberOfFrames 'abc': pydicom refuses to write it, so the valid '1' is patched in the bytes."""
    data = dicom_bytes(_set(NumberOfFrames="1"))
    valid, invalid = b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x04\x00abc "
    assert data.count(valid) == 1
    return data.replace(valid, invalid)


def _unknown_transfer_syntax() -> bytes:
    """Explicit VR Little Endian's UID with its first digit changed: no transfer syntax (found by the fuzz test)."""
    data = dicom_bytes()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"0.2.840.10008.1.2.1\x00")


def _float_tiff(bad_value: float) -> bytes:
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[3, 3] = bad_value
    stream = BytesIO()
    Image.fromarray(pixels).save(stream, format="TIFF")
    return stream.getvalue()


# name -> (file bytes, exact reason after "<path>: ")
CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "ztxt_over_limit.png": (lambda: png_bytes(png_chunk(b"zTXt", b"k\x00\x00" + _big_compressed_text())), TEXT_LIMIT),
    "itxt_over_limit.png": (
        lambda: png_bytes(png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + _big_compressed_text())), TEXT_LIMIT
    ),
    "iccp_over_limit.png": (lambda: png_bytes(png_chunk(b"iCCP", b"k\x00\x00" + _big_compressed_text())), TEXT_LIMIT),
    "short_ihdr.png": (lambda: png_bytes(header=b"\x00\x00\x00\x04\x00"), "corrupt PNG header (Truncated IHDR chunk)"),
    "columns_empty.dcm": (lambda: dicom_bytes(_empty("Columns")), "DICOM Columns is empty"),
    "rows_missing.dcm": (lambda: dicom_bytes(_set(Rows=None)), "DICOM Rows is missing"),
    "photometric_xyz.dcm": (
        lambda: dicom_bytes(_set(PhotometricInterpretation="XYZ")), "unsupported photometric interpretation 'XYZ'"
    ),
    "photometric_missing.dcm": (
        lambda: dicom_bytes(_set(PhotometricInterpretation=None)), "DICOM PhotometricInterpretation is missing"
    ),
    "frames_abc.dcm": (_number_of_frames_abc, "DICOM NumberOfFrames is 'abc', not a positive whole number"),
    "frames_zero.dcm": (
        lambda: dicom_bytes(_set(NumberOfFrames=0)), "DICOM NumberOfFrames is '0', not a positive whole number"
    ),
    "bits_allocated_12.dcm": (
        lambda: dicom_bytes(_set(BitsAllocated=12)), "unsupported DICOM BitsAllocated 12 (supported: 1, 8, 16 or 32)"
    ),
    "samples_3_mono.dcm": (
        lambda: dicom_bytes(_set(SamplesPerPixel=3)),
        "DICOM SamplesPerPixel is 3, but photometric interpretation 'MONOCHROME2' has 1",
    ),
    "transfer_syntax_unknown.dcm": (_unknown_transfer_syntax, "unknown DICOM transfer syntax '0.2.840.10008.1.2.1'"),
    "nan.tif": (lambda: _float_tiff(np.nan), NON_FINITE),
    "inf.tif": (lambda: _float_tiff(np.inf), NON_FINITE),
}


def write_cases(folder: Path) -> dict[Path, str]:
    """Every bad case as a file in ``folder``; returns {path: exact one-line message}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (make, reason) in CASES.items():
        path = folder / name
        path.write_bytes(make())
        expected[path] = f"{path}: {reason}"
    return expected


# --- decode_grayscale: the exact one-line reason ------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file_is_one_line_naming_the_file_and_the_reason(tmp_path, name):
    make, reason = CASES[name]
    path = tmp_path / name
    path.write_bytes(make())

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)

    assert str(excinfo.value) == f"{path}: {reason}"


def test_the_same_files_made_valid_decode(tmp_path):
    """The fixtures differ from valid files only in the broken part."""
    good = {"good.png": png_bytes(), "good.dcm": dicom_bytes()}
    for name, data in good.items():
        (tmp_path / name).write_bytes(data)
        assert decode_grayscale(tmp_path / name, SIZE).shape == (SIZE, SIZE)


def test_png_over_the_decode_byte_limit_names_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "sixteen_bit.png"
    Image.fromarray(np.arange(10_000, dtype=np.uint16).reshape(100, 100)).save(path)
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 40_000)

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)

    assert str(excinfo.value) == (
        f"{path}: image too large to decode (100x100 at 2 bytes per pixel needs 50,000 bytes; "
        "the limit is MAX_DECODE_BYTES = 40,000 bytes)"
    )


def test_deflated_dicom_inflating_past_the_limit_is_refused_before_pydicom_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "deflated.dcm"
    frames = np.zeros((20, 250, 250), dtype=np.uint8)  # 1.25 MB inflated, a few KB on disk
    dicom_dataset(frames, bits_stored=8, syntax=DeflatedExplicitVRLittleEndian).save_as(path, enforce_file_format=True)
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(images.pydicom, "dcmread", lambda *args, **kwargs: pytest.fail("pydicom read the file"))

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)

    assert str(excinfo.value) == (
        f"{path}: DICOM file too large to decode (its Deflated data inflates to more than 1,048,576 bytes; "
        "the limit is MAX_DECODE_BYTES / 2 = 1,048,576 bytes)"
    )


# --- memory: one frame, and a bound in bytes -----------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_multi_frame_dicom_decodes_only_its_first_frame(tmp_path, monkeypatch, syntax):
    first = np.tile(np.array([0, 255], dtype=np.uint8).repeat(SIZE // 2), (SIZE, 1))
    frames = np.stack([first, *[255 - first] * 30])
    path = tmp_path / "frames.dcm"
    dicom_dataset(frames, bits_stored=8, syntax=syntax).save_as(path, enforce_file_format=True)
    asked = []

    def recording_pixel_array(source, **kwargs):
        asked.append(kwargs)
        return real_pixel_array(source, **kwargs)

    real_pixel_array = images.pixel_array
    monkeypatch.setattr(images, "pixel_array", recording_pixel_array)

    decoded = decode_grayscale(path, SIZE)

    assert asked == [{"index": 0}]
    np.testing.assert_array_equal(decoded, first)


_RSS_SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
from cxr.data.images import decode_grayscale
warm_up = Path(sys.argv[2])
Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8)).save(warm_up)
decode_grayscale(warm_up, 224)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_grayscale(Path(sys.argv[1]), 224)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_sixteen_bit_png_peak_memory_is_within_the_documented_bound(tmp_path):
    """The module docstring's bound: pixels x (2 x 2 bytes + 1) + 16 MB of row-block working memory."""
    path = tmp_path / "sixteen_bit_3000.png"
    Image.fromarray(np.tile(np.arange(3000, dtype=np.uint16), (3000, 1))).save(path)
    bound = 3000 * 3000 * (2 * 2 + 1) + 16 * 1024 * 1024

    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / "warm_up.png")],
        capture_output=True, text=True, check=True,
    )

    growth = int(result.stdout)
    assert growth <= bound, f"peak RSS grew by {growth:,} bytes decoding a 16-bit 3000x3000 PNG; the bound is {bound:,}"


# --- preprocess: skipped and listed, the run goes on -------------------------------------------


def test_preprocess_skips_each_bad_file_with_its_reason_and_keeps_the_rest(tmp_path):
    data = make_kaggle_tree(tmp_path / "raw", per_class=2, size=40, splits=("train",))
    expected = write_cases(data / "train" / "NORMAL")
    frame = index_split(data, "train", CLASSES)

    kept, skipped = preprocess_split(data, frame, SIZE, 1, "train", CLASSES, tmp_path / "processed")

    assert len(kept) == 2 * len(CLASSES)
    assert dict(zip(skipped["path"], skipped["reason"])) == {
        str(path.relative_to(data)): message for path, message in expected.items()
    }
    assert np.load(tmp_path / "processed" / "train.npy").shape == (len(kept), SIZE, SIZE)


# --- cxr-predict on a folder: valid images predicted, one stderr line per bad file -----------------


@pytest.fixture
def checkpoint_path(tmp_path: Path) -> Path:
    """A tiny untrained custom CNN saved the way training saves one (see :func:`good_checkpoint`)."""
    path = tmp_path / "model.pt"
    torch.save(good_checkpoint(), path)
    return path


def test_predict_on_a_folder_predicts_the_valid_images_and_reports_each_bad_one_on_one_line(
    checkpoint_path, tmp_path, capsys
):
    folder = tmp_path / "xrays"
    expected = write_cases(folder)
    valid = [folder / "valid.png", folder / "valid.dcm"]
    valid[0].write_bytes(png_bytes())
    valid[1].write_bytes(dicom_bytes())

    predict_main([str(checkpoint_path), str(folder), "--json"])

    out, err = capsys.readouterr()
    assert sorted(row["path"] for row in json.loads(out)) == sorted(map(str, valid))
    assert sorted(err.splitlines()) == sorted(f"skipped {message}" for message in expected.values())


# === Checkpoints, the groups CSV and params.yaml (cases 9-11) ===============================================


MODEL_ARGS = {"arch": "custom_cnn", "num_classes": 3, "mean": [0.5], "std": [0.25], "width": 4}
CPU = torch.device("cpu")


def good_checkpoint() -> dict[str, Any]:
    """A tiny untrained custom CNN as the training stage saves it (width 4: a 32-feature head)."""
    torch.manual_seed(0)
    model = build_model(**MODEL_ARGS)
    return {"model": model.state_dict(), "model_args": dict(MODEL_ARGS), "approach": "custom",
            "classes": list(CLASSES), "image_size": 32}


def changed(**changes: Any) -> Callable[[Path], None]:
    """A writer of the good checkpoint with keys replaced (or removed, for ``None``)."""
    def write(path: Path) -> None:
        checkpoint = {**good_checkpoint(), **changes}
        torch.save({key: value for key, value in checkpoint.items() if value is not None}, path)
    return write


def with_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        checkpoint = good_checkpoint()
        edit(checkpoint["model"])
        torch.save(checkpoint, path)
    return write


NOT_OURS = "{path} is not a checkpoint written by this pipeline"
CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty_file": (lambda path: path.write_bytes(b""), "{path} is not a model checkpoint: the file is empty"),
    "a_list": (lambda path: torch.save([1, 2], path), NOT_OURS + " (it holds a list)"),
    "no_classes": (changed(classes=None), NOT_OURS + " (no 'classes' key)"),
    "no_image_size": (changed(image_size=None), NOT_OURS + " (no 'image_size' key)"),
    "no_approach": (changed(approach=None), NOT_OURS + " (no 'approach' key)"),
    "image_size_true": (changed(image_size=True),
                        "{path}: checkpoint key 'image_size' must be a whole number of pixels from 32 to 1024, got True"),
    "image_size_tiny": (changed(image_size=8),
                        "{path}: checkpoint key 'image_size' must be a whole number of pixels from 32 to 1024, got 8"),
    "image_size_float": (changed(image_size=32.0),
                         "{path}: checkpoint key 'image_size' must be a whole number of pixels from 32 to 1024, got 32.0"),
    "classes_a_string": (changed(classes="COVID19"),
                         "{path}: checkpoint key 'classes' must be a non-empty list of class names, got 'COVID19'"),
    "classes_numbers": (changed(classes=[0, 1, 2]),
                        "{path}: checkpoint key 'classes' must be a non-empty list of class names, got [0, 1, 2]"),
    "classes_empty": (changed(classes=[]),
                      "{path}: checkpoint key 'classes' must be a non-empty list of class names, got []"),
    "model_not_weights": (changed(model="weights"),
                          "{path}: checkpoint key 'model' must be a state_dict of named tensors, got 'weights'"),
    "model_args_a_list": (changed(model_args=["custom_cnn"]),
                          "{path}: checkpoint key 'model_args' must be a mapping of build_model arguments, "
                          "got ['custom_cnn']"),
    "unknown_arch": (changed(model_args={**MODEL_ARGS, "arch": "vgg"}),
                     "{path}: checkpoint key 'model_args' does not describe a model "
                     "(unknown architecture 'vgg'; allowed: custom_cnn, resnet18)"),
    "unknown_model_arg": (changed(model_args={**MODEL_ARGS, "depth": 3}),
                          "{path}: checkpoint key 'model_args' does not describe a model "
                          "(build_model() got an unexpected keyword argument 'depth')"),
    "shape_mismatch": (changed(model_args={**MODEL_ARGS, "num_classes": 2}),
                       "{path}: the weights do not match the model its model_args describe: "
                       "head.1.weight: checkpoint [3, 32], model [2, 32] (and 1 more)"),
    "missing_parameter": (with_weights(lambda state: state.pop("head.1.bias")),
                          "{path}: the weights do not match the model its model_args describe: "
                          "head.1.bias missing from the checkpoint (model [3])"),
    "unexpected_parameter": (with_weights(lambda state: state.update({"extra.weight": torch.zeros(2)})),
                             "{path}: the weights do not match the model its model_args describe: "
                             "extra.weight is in the checkpoint but not in the model"),
}


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, to show a run left the user's files as they were."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))).save(path)
    return path


# --- checkpoints through cxr-predict -----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_bad_checkpoint_stops_cxr_predict_with_one_line(case, tmp_path, capsys):
    write, expected = CHECKPOINT_CASES[case]
    user = tmp_path / "user"
    user.mkdir()
    model = user / "model.pt"
    write(model)
    image = write_image(user / "scan.png")
    before = contents(user)

    with pytest.raises(SystemExit) as excinfo:
        predict_main([str(model), str(image)])

    assert excinfo.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {expected.format(path=model)}\n"
    assert contents(user) == before


def test_cxr_predict_process_reports_an_empty_checkpoint_without_a_traceback(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    image = write_image(tmp_path / "scan.png")

    done = subprocess.run([sys.executable, "-m", "cxr.predict", str(model), str(image)],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"error: {model} is not a model checkpoint: the file is empty\n"


def test_a_good_checkpoint_still_predicts(tmp_path, capsys):
    model = tmp_path / "model.pt"
    changed()(model)
    predict_main([str(model), str(write_image(tmp_path / "scan.png")), "--json"])
    assert [row["path"] for row in yaml.safe_load(capsys.readouterr().out)] == [str(tmp_path / "scan.png")]


# --- checkpoints where the external stage reads them ---------------------------------------------------


@pytest.mark.parametrize("case", ["empty_file", "no_classes", "no_image_size", "image_size_true", "shape_mismatch"])
def test_a_bad_checkpoint_is_one_line_where_external_reads_it(case, tmp_path):
    write, expected = CHECKPOINT_CASES[case]
    model = tmp_path / "custom.pt"
    write(model)
    validated_at_load = case != "shape_mismatch"  # image_sizes reads the file without building the model

    with pytest.raises(PipelineError) as excinfo:
        load_scorers({"custom": model}, list(CLASSES), [], CPU)
    assert str(excinfo.value) == expected.format(path=model)
    if validated_at_load:
        with pytest.raises(PipelineError) as excinfo:
            image_sizes({"custom": model})
        assert str(excinfo.value) == expected.format(path=model)
    else:
        assert image_sizes({"custom": model}) == [32]


# --- the evaluate stage: its checkpoint and the groups CSV ---------------------------------------


def evaluate_project(tmp_path: Path, groups: dict[str, str] | None = None) -> Path:
    """A temporary project that evaluate@custom can run in: params, a tiny model, 1 + 3 images per class.

    ``train.threads`` 0 and no host memory reuse leave the process as it was when the stage
    runs inside the test process.
    """
    project = tmp_path / "project"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(threads=0, device="cpu", reuse_freed_memory=False)
    raw["evaluate"].update(gradcam_per_class=1, tta=[])
    raw["groups"] = groups
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_processed(project / "data" / "processed", {"val": 1, "test": 3})
    (project / "models").mkdir()
    changed()(project / "models" / "custom.pt")
    return project


def run_evaluate(project: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run stages/evaluate.py custom as ``python`` would, in this process (fast); returns its exit status."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "stages" / "evaluate.py"), "custom"])
    try:
        runpy.run_path(str(ROOT / "stages" / "evaluate.py"), run_name="__main__")
    except SystemExit as exit:
        return int(exit.code)
    return 0


def test_evaluate_process_reports_a_checkpoint_without_classes_in_one_line(tmp_path):
    project = evaluate_project(tmp_path)
    changed(classes=None)(project / "models" / "custom.pt")
    before = contents(project)

    done = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "custom"], cwd=project,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"error: {NOT_OURS.format(path='models/custom.pt')} (no 'classes' key)\n"
    assert contents(project) == before


@pytest.mark.parametrize("case", ["empty_file", "no_image_size", "image_size_true", "unknown_arch"])
def test_a_bad_checkpoint_stops_the_evaluate_stage_with_one_line(case, tmp_path, monkeypatch, capsys):
    write, expected = CHECKPOINT_CASES[case]
    project = evaluate_project(tmp_path)
    write(project / "models" / "custom.pt")
    before = contents(project)

    assert run_evaluate(project, monkeypatch) == 1
    assert capsys.readouterr().err == f"error: {expected.format(path='models/custom.pt')}\n"
    assert contents(project) == before


TEST_PATHS = [f"test/{i}.jpg" for i in range(9)]  # what write_processed names the 3 x 3 test images


def write_csv(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GROUPS_CASES: dict[str, tuple[str | bytes, str]] = {
    "empty": ("", "groups: {csv} is empty"),
    "header_only": ("file,source_repo\n", "groups: {csv} has no rows"),
    "latin1": ("file,source_repo\ntest/0.jpg,S\xe3o Paulo\n".encode("latin-1"),
               "groups: {csv} is not UTF-8 text"),
    "unclosed_quote": ('file,source_repo\n"test/0.jpg,a\n',
                       "groups: {csv} is not a readable CSV: Error tokenizing data. "
                       "C error: EOF inside string starting at row 1"),
    "no_group_column": ("file,site\ntest/0.jpg,a\n", "groups: {csv} has no column 'source_repo'"),
    "two_groups_for_one_image": ("file,source_repo\nData/test/0.jpg,a\ntest/1.jpg,a\ntest/0.jpg,b\n",
                                 "groups: {csv} lists 'test/0.jpg' twice with different groups: 'a' and 'b'"),
    "a_folder": (b"", "groups.csv: no such file {csv}"),
}


@pytest.mark.parametrize("case", list(GROUPS_CASES))
def test_a_bad_groups_csv_stops_the_evaluate_stage_with_one_line(case, tmp_path, monkeypatch, capsys):
    text, expected = GROUPS_CASES[case]
    csv = tmp_path / "groups.csv"
    if case == "a_folder":
        csv.mkdir()
    else:
        write_csv(csv, text)
    project = evaluate_project(tmp_path, {"csv": str(csv)})
    before = contents(tmp_path)

    assert run_evaluate(project, monkeypatch) == 1
    assert capsys.readouterr().err == f"error: {expected.format(csv=csv)}\n"
    assert contents(tmp_path) == before  # no output written, the CSV as it was


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        # every test image, half of them written with the data set's Data/ prefix, one listed twice in one group
        ([f"Data/{p}" if i % 2 else p for i, p in enumerate(TEST_PATHS)] + ["test/0.jpg"],
         [("INFO", "groups: 9 of 9 test images matched a row of {csv}")]),
        (["test/0.jpg", "test/1.jpg", "test/2.jpg", "test/3.jpg", "elsewhere/4.jpg"],
         [("INFO", "groups: 4 of 9 test images matched a row of {csv}"),
          ("WARNING", "groups: 5 of 9 test images match no row of {csv}; "
                      "its column 'file' should hold paths like 'test/0.jpg'")]),
    ],
    ids=["all_match", "most_unmatched"],
)
def test_the_evaluate_stage_logs_how_many_test_images_the_groups_csv_matches(listed, expected, tmp_path, monkeypatch,
                                                                              caplog):
    csv = tmp_path / "groups.csv"
    pd.DataFrame({"file": listed, "source_repo": ["site"] * len(listed)}).to_csv(csv, index=False)
    project = evaluate_project(tmp_path, {"csv": str(csv)})

    with caplog.at_level(logging.INFO, logger="cxr.data.groups"):
        assert run_evaluate(project, monkeypatch) == 0

    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "cxr.data.groups"]
    assert logged == [(level, message.format(csv=csv)) for level, message in expected]
    assert len(pd.read_csv(project / "metrics" / "predictions" / "custom.csv")) == 9


# --- the groups CSV in the library: duplicates and the Markdown table --------------------------------


def test_an_image_listed_twice_in_the_same_group_counts_once(tmp_path):
    csv = write_csv(tmp_path / "groups.csv", "file,source_repo\nData/test/0.jpg,a\ntest/0.jpg,a\ntest/1.jpg,b\n")
    groups = load_groups(GroupsParams(csv=str(csv)))
    assert groups.to_dict() == {"test/0.jpg": "a", "test/1.jpg": "b"}


def test_log_matches_counts_paths_with_or_without_data(tmp_path, caplog):
    settings = GroupsParams(csv="groups.csv")
    groups = pd.Series(["a", "b"], index=["test/0.jpg", "test/1.jpg"])
    with caplog.at_level(logging.INFO, logger="cxr.data.groups"):
        assert log_matches(settings, groups, pd.Series(["Data/test/0.jpg", "test/1.jpg", "test/2.jpg"])) == 2
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "groups: 2 of 3 test images matched a row of groups.csv")]


def test_group_names_cannot_break_the_markdown_table():
    name = "north|south\nwing *A*"
    frame = predictions_frame(["test/0.jpg"] * 10, np.ones(10, dtype=int), np.tile([0.1, 0.8, 0.1], (10, 1)), CLASSES)
    report = subgroup_report({"custom": frame}, pd.Series([name], index=["test/0.jpg"]), list(CLASSES), 20, 0)
    assert list(report["custom"]["groups"]) == [name]  # the JSON keeps the raw name

    text = subgroups_markdown(report, list(CLASSES), "site|wing")

    table = [line for line in text.splitlines() if line.startswith("| north")]
    assert table == [r"| north\|south wing \*A\* | 10 | 1.000 [1.000, 1.000] | - | 1.000 [1.000, 1.000] | - | - | - | - | - |"]
    assert r"(worst group: north\|south wing \*A\*)" in text
    assert r"grouped by site\|wing;" in text


# --- params.yaml ---------------------------------------------------------------------------------------


COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("section, key", [("split", "seed"), ("train", "seed"), ("compare", "bootstrap_seed")])
@pytest.mark.parametrize("value", [-1, 2**32, 10**30])
def test_a_seed_numpy_cannot_take_is_one_line(section, key, value, tmp_path):
    raw = copy.deepcopy(COMMITTED)
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    assert str(excinfo.value) == f"params.yaml: {section}.{key} is {value}; allowed: >= 0 and <= 4294967295"


@pytest.mark.parametrize("value", [0, 2**32 - 1])
def test_every_numpy_seed_is_accepted(value, tmp_path):
    raw = copy.deepcopy(COMMITTED)
    for section, key in (("split", "seed"), ("train", "seed"), ("compare", "bootstrap_seed")):
        raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    assert (params.split.seed, params.train.seed, params.compare.bootstrap_seed) == (value, value, value)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes() + "# S\xe3o Paulo\n".encode("latin-1"))
    before = path.read_bytes()
    bad_byte = before.index(b"\xe3")

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    assert str(excinfo.value) == f"{path} is not UTF-8 text (byte {bad_byte})"
    assert path.read_bytes() == before


def test_a_folder_named_params_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.mkdir()
    with pytest.raises(PipelineError) as excinfo:
        load_params(path)
    assert str(excinfo.value) == f"{path} is a folder, not a file"
    assert path.is_dir() and not any(path.iterdir())


def test_an_unreadable_params_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("data: {}\n")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # the tests may run as root, whom chmod does not stop
    with pytest.raises(PipelineError) as excinfo:
        load_params(path)
    assert str(excinfo.value) == f"cannot read {path}: Permission denied"
