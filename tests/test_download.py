"""fetch_dataset: every source lands as the same checked Data tree; every failure is one line and changes nothing."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import kagglehub
import pytest
import requests
from kagglehub.exceptions import DataCorruptionError, KaggleApiHTTPError

from cxr.data.download import fetch_dataset, kagglehub_download
from cxr.errors import PipelineError

from conftest import CLASSES, make_kaggle_tree, make_kaggle_zip
from test_pipeline import _env, make_project

HANDLE = "someone/chest-xray/versions/1"


def fetch(source: str | Path, destination: Path, **kwargs) -> Path:
    return fetch_dataset(str(source), HANDLE, CLASSES, destination, **kwargs)


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_snapshot(archive: Path) -> dict[str, bytes]:
    """The archive's files below its ``Data/`` folder, keyed like :func:`tree_snapshot`."""
    with zipfile.ZipFile(archive) as zf:
        return {
            name.split("Data/", 1)[1]: zf.read(name)
            for name in zf.namelist()
            if "Data/" in name and not name.endswith("/") and "__MACOSX" not in name
        }


def leftovers(destination: Path) -> list[str]:
    """Temporary folders fetch_dataset might have left beside the destination (none where it never made the parent)."""
    if not destination.parent.exists():
        return []
    return sorted(p.name for p in destination.parent.iterdir() if p.name.startswith(f".{destination.name}-"))


def one_line_error(destination: Path, source: str | Path, **kwargs) -> str:
    """Fetch, expect a PipelineError, and check that nothing was installed or left behind."""
    before = tree_snapshot(destination) if destination.exists() else None
    with pytest.raises(PipelineError) as excinfo:
        fetch(source, destination, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    if before is None:
        assert not destination.exists()
    else:
        assert tree_snapshot(destination) == before
    assert leftovers(destination) == []
    return message


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    return tmp_path / "project" / "data" / "raw"


def test_kaggle_tree_fixture_has_the_kaggle_layout(kaggle_tree):
    assert kaggle_tree.name == "Data"
    for split in ("train", "test"):
        assert sorted(p.name for p in (kaggle_tree / split).iterdir()) == list(CLASSES)
        for label in CLASSES:
            assert len(list((kaggle_tree / split / label).glob("*.jp*g"))) == 4
    assert (kaggle_tree / "train" / "PNEUMONIA" / "person0_bacteria_1.jpeg").is_file()


def test_kaggle_tree_fixture_is_reproducible_and_seeded(tmp_path):
    first = tree_snapshot(make_kaggle_tree(tmp_path / "a", seed=3))

    assert tree_snapshot(make_kaggle_tree(tmp_path / "b", seed=3)) == first
    assert tree_snapshot(make_kaggle_tree(tmp_path / "c", seed=4)) != first


def test_a_local_zip_is_installed_as_its_data_folder(kaggle_zip, destination):
    result = fetch(kaggle_zip, destination)

    assert result == destination
    assert tree_snapshot(destination) == zip_snapshot(kaggle_zip)
    assert sorted(p.name for p in destination.iterdir()) == ["test", "train"]
    assert leftovers(destination) == []


@pytest.mark.parametrize("pick", ["data_folder", "its_parent"])
def test_a_local_folder_is_copied_and_left_untouched(kaggle_tree, destination, pick):
    source = kaggle_tree if pick == "data_folder" else kaggle_tree.parent
    original = tree_snapshot(kaggle_tree)

    fetch(source, destination)

    assert tree_snapshot(destination) == original
    assert tree_snapshot(kaggle_tree) == original


def test_a_zip_with_an_extra_top_folder_is_accepted(tmp_path, destination):
    archive = make_kaggle_zip(tmp_path, top_folder="chest_xray")

    fetch(archive, destination)

    assert tree_snapshot(destination) == zip_snapshot(archive)


@pytest.mark.parametrize("top_folder", [None, "archive"])
def test_macos_junk_in_a_zip_is_ignored(tmp_path, destination, top_folder):
    archive = make_kaggle_zip(tmp_path, top_folder=top_folder)
    prefix = f"{top_folder}/" if top_folder else ""
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(f"__MACOSX/{prefix}Data/train/COVID19/._covid19_000.jpg", b"\x00\x05\x16\x07 apple double")
        zf.writestr(f"__MACOSX/{prefix}Data/test/NORMAL/._IM-0000-0001.jpeg", b"\x00\x05\x16\x07 apple double")
        zf.writestr(f"__MACOSX/{prefix}._Data", b"\x00\x05\x16\x07")

    fetch(archive, destination)

    assert tree_snapshot(destination) == zip_snapshot(archive)
    assert not list(destination.rglob("._*"))


def test_missing_test_split_is_named(tmp_path, destination):
    source = make_kaggle_tree(tmp_path / "src", splits=("train",))

    message = one_line_error(destination, source)

    assert message.endswith("missing folder test/ (expected train, test)")


def test_an_unknown_class_folder_is_named(tmp_path, destination):
    source = make_kaggle_tree(tmp_path / "src", per_class=1, classes=(*CLASSES, "TUBERCULOSIS"))

    message = one_line_error(destination, source)

    assert "unknown class folder 'TUBERCULOSIS'; expected only COVID19, NORMAL, PNEUMONIA" in message


def test_a_missing_class_folder_is_named(tmp_path, destination):
    source = make_kaggle_tree(tmp_path / "src", per_class=1, classes=("COVID19", "NORMAL"))

    message = one_line_error(destination, source)

    assert message.endswith("train: missing class folder PNEUMONIA/")


def test_an_empty_class_folder_is_named(tmp_path, destination):
    source = make_kaggle_tree(tmp_path / "src", per_class={"COVID19": 1, "NORMAL": 1})

    message = one_line_error(destination, source)

    assert message.endswith("train/PNEUMONIA: class folder is empty")


def test_a_class_folder_holding_only_hidden_files_counts_as_empty(tmp_path, destination):
    source = make_kaggle_tree(tmp_path / "src", per_class={"COVID19": 1, "NORMAL": 1})
    (source / "train" / "PNEUMONIA" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    message = one_line_error(destination, source)

    assert message.endswith("train/PNEUMONIA: class folder is empty")


@pytest.mark.slow
def test_a_class_folder_holding_only_os_junk_stops_dvc_repro_download_with_one_line_naming_it(tmp_path):
    source = make_kaggle_tree(tmp_path / "src", per_class=2)
    junk_only = source / "test" / "NORMAL"
    for image in junk_only.iterdir():
        image.unlink()
    for junk in ("Thumbs.db", ".DS_Store", "desktop.ini"):
        (junk_only / junk).write_bytes(b"\x00junk")
    project = make_project(tmp_path, source.parent, image_size=32, epochs=1)

    done = subprocess.run(["dvc", "repro", "download"], cwd=project, env=_env(), capture_output=True, text=True)

    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].endswith("test/NORMAL: class folder is empty"), done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "data" / "raw").exists()


def test_a_source_without_any_data_folder_is_rejected(tmp_path, destination):
    archive = tmp_path / "wrong.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/readme.txt", "nothing here")

    message = one_line_error(destination, archive)

    assert "no Data/train or Data/test folder found" in message


def test_two_data_folders_are_not_mixed(tmp_path, destination):
    make_kaggle_tree(tmp_path / "both" / "first", per_class=1)
    make_kaggle_tree(tmp_path / "both" / "second", per_class=1)

    message = one_line_error(destination, tmp_path / "both")

    assert "several data roots found (" in message
    assert "first/Data" in message and "second/Data" in message


def test_a_file_that_is_not_a_zip_is_rejected_by_name(tmp_path, destination):
    source = tmp_path / "chest_xray.tar.gz"
    source.write_bytes(b"\x1f\x8b\x08\x00 not really gzip either")

    message = one_line_error(destination, source)

    assert message == f"data.source {str(source)!r} is neither a folder nor a .zip file"


def test_a_nonexistent_path_is_rejected_by_name(tmp_path, destination):
    source = tmp_path / "nowhere" / "chest_xray.zip"

    message = one_line_error(destination, source)

    assert message.startswith(f"data.source {str(source)!r}: no such file or folder")


def _flip_byte_inside_member(archive: Path, member: str, offset: int | None = None) -> None:
    """Invert one byte of a member's stored data (``offset`` into it; the middle by default)."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    raw = bytearray(archive.read_bytes())
    # Local header: 30 fixed bytes + name + extra field, then the member data.
    name_length = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    data_start = info.header_offset + 30 + name_length + extra_length
    raw[data_start + (info.compress_size // 2 if offset is None else offset)] ^= 0xFF
    archive.write_bytes(bytes(raw))


def test_garbage_named_zip_is_rejected(tmp_path, destination):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"<html>Please log in</html>")

    message = one_line_error(destination, archive)

    assert message.startswith(f"{archive} is not a valid zip file")


def test_a_truncated_zip_is_rejected(kaggle_zip, destination):
    kaggle_zip.write_bytes(kaggle_zip.read_bytes()[: kaggle_zip.stat().st_size // 2])

    message = one_line_error(destination, kaggle_zip)

    assert message.startswith(f"{kaggle_zip} is not a valid zip file")


def test_a_stored_zip_with_a_damaged_member_names_the_member(kaggle_zip, destination):
    member = "Data/train/NORMAL/IM-0001-0001.jpeg"
    _flip_byte_inside_member(kaggle_zip, member)

    message = one_line_error(destination, kaggle_zip)

    assert message == f"{kaggle_zip}: corrupt zip member {member}"


def test_a_deflated_zip_with_damaged_data_is_a_pipeline_error(tmp_path, destination):
    archive = tmp_path / "deflated.zip"
    member = "Data/train/COVID19/a.jpg"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, bytes(range(256)) * 64)
    # Damaging the start of the deflate stream makes zlib itself fail, before any CRC check.
    _flip_byte_inside_member(archive, member, offset=1)

    message = one_line_error(destination, archive)

    assert message.startswith(f"{archive} is not a valid zip file (Error -3 while decompressing data")


class FakeKaggle:
    """A stand-in for kagglehub: records its calls and returns what ``produce`` builds."""

    def __init__(self, produce):
        self.produce = produce
        self.calls: list[tuple[str, Path]] = []

    def __call__(self, handle: str, workdir: Path) -> Path:
        self.calls.append((handle, workdir))
        return self.produce(workdir)


def test_kaggle_source_uses_the_downloaded_folder(destination):
    def download_like_kagglehub(workdir: Path) -> Path:
        return make_kaggle_tree(workdir / "kaggle", per_class=2).parent

    fake = FakeKaggle(download_like_kagglehub)

    fetch("kaggle", destination, kaggle=fake)

    [(handle, workdir)] = fake.calls
    assert handle == HANDLE
    assert workdir.parent == destination.parent
    assert not workdir.exists()
    assert sorted(p.name for p in (destination / "train" / "PNEUMONIA").iterdir()) == [
        "person0_bacteria_0.jpeg",
        "person0_bacteria_1.jpeg",
    ]
    assert leftovers(destination) == []


def test_kaggle_source_extracts_a_downloaded_zip(kaggle_zip, destination):
    def download_zip(workdir: Path) -> Path:
        return Path(shutil.copy(kaggle_zip, workdir / "chest-xray.zip"))

    fetch("kaggle", destination, kaggle=FakeKaggle(download_zip))

    assert tree_snapshot(destination) == zip_snapshot(kaggle_zip)


def test_kaggle_folder_outside_the_workdir_is_copied_not_moved(kaggle_tree, destination):
    """Inside Kaggle/Colab notebooks kagglehub returns a read-only mount instead of output_dir."""
    original = tree_snapshot(kaggle_tree)

    fetch("kaggle", destination, kaggle=FakeKaggle(lambda workdir: kaggle_tree.parent))

    assert tree_snapshot(destination) == original
    assert tree_snapshot(kaggle_tree) == original


def test_kaggle_download_with_a_bad_layout_installs_nothing(destination):
    fake = FakeKaggle(lambda workdir: make_kaggle_tree(workdir / "kaggle", per_class=1, splits=("train",)))

    message = one_line_error(destination, "kaggle", kaggle=fake)

    assert "missing folder test/" in message


def test_a_failing_kaggle_download_installs_nothing(destination):
    def refuse(workdir: Path) -> Path:
        raise PipelineError("Kaggle refused access")

    assert one_line_error(destination, "kaggle", kaggle=FakeKaggle(refuse)) == "Kaggle refused access"


@pytest.fixture
def fake_dataset_download(monkeypatch):
    """Replace ``kagglehub.dataset_download`` with a recorder that raises or builds what a test sets."""
    calls: list[dict] = []
    behaviour: dict = {}

    def dataset_download(handle, path=None, *, force_download=False, output_dir=None):
        calls.append({"handle": handle, "output_dir": output_dir, "force_download": force_download})
        if "error" in behaviour:
            raise behaviour["error"]
        return str(make_kaggle_tree(Path(output_dir), per_class=1).parent)

    monkeypatch.setattr(kagglehub, "dataset_download", dataset_download)
    return calls, behaviour


def test_kagglehub_download_asks_for_a_fresh_copy_inside_the_workdir(tmp_path, fake_dataset_download):
    calls, _ = fake_dataset_download

    result = kagglehub_download(HANDLE, tmp_path)

    assert calls == [{"handle": HANDLE, "output_dir": str(tmp_path / "kaggle"), "force_download": True}]
    assert result == tmp_path / "kaggle"
    assert (result / "Data" / "test" / "NORMAL").is_dir()


def test_fetch_dataset_uses_kagglehub_by_default(destination, fake_dataset_download):
    calls, _ = fake_dataset_download

    fetch("kaggle", destination)

    assert [call["handle"] for call in calls] == [HANDLE]
    assert sorted(p.name for p in (destination / "train").iterdir()) == list(CLASSES)
    assert leftovers(destination) == []


def _kaggle_error(tmp_path: Path, error: Exception, fake_dataset_download) -> str:
    _, behaviour = fake_dataset_download
    behaviour["error"] = error
    with pytest.raises(PipelineError) as excinfo:
        kagglehub_download(HANDLE, tmp_path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert HANDLE in message
    return message


@pytest.mark.parametrize(
    "error",
    [
        OSError("Network is unreachable"),
        ConnectionError("Connection refused"),
        requests.ConnectionError("Max retries exceeded with url: /api/v1/datasets/download"),
    ],
    ids=["OSError", "ConnectionError", "requests.ConnectionError"],
)
def test_offline_kaggle_download_explains_the_alternatives(tmp_path, fake_dataset_download, error):
    message = _kaggle_error(tmp_path, error, fake_dataset_download)

    assert message.startswith(f"cannot reach Kaggle to download {HANDLE} ({type(error).__name__}: {error})")
    assert "data.source" in message


def _http_error(status: int, message: str) -> KaggleApiHTTPError:
    response = requests.Response()
    response.status_code = status
    return KaggleApiHTTPError(message, response=response)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_kaggle_download_explains_how_to_give_credentials(tmp_path, fake_dataset_download, status):
    message = _kaggle_error(tmp_path, _http_error(status, "Unauthorized\nsee the docs"), fake_dataset_download)

    assert f"(HTTP {status})" in message
    for hint in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "~/.kaggle"):
        assert hint in message


def test_other_kaggle_http_errors_keep_their_first_line(tmp_path, fake_dataset_download):
    error = _http_error(404, "404 Client Error: Not Found for url\nThe server reported: no such dataset")

    message = _kaggle_error(tmp_path, error, fake_dataset_download)

    assert message == f"Kaggle download of {HANDLE} failed: 404 Client Error: Not Found for url"


@pytest.mark.parametrize("bad_handle", ["prashant268", "owner/dataset/versions/latest"])
def test_a_malformed_handle_points_at_the_param(tmp_path, bad_handle):
    with pytest.raises(PipelineError) as excinfo:
        kagglehub_download(bad_handle, tmp_path)

    message = str(excinfo.value)
    assert message.startswith(f"Kaggle download of {bad_handle} failed: Invalid ")
    assert "check data.kaggle_handle" in message
    assert "\n" not in message


def test_an_http_error_without_a_message_is_still_one_line(tmp_path, fake_dataset_download):
    message = _kaggle_error(tmp_path, _http_error(500, ""), fake_dataset_download)

    assert message == f"Kaggle download of {HANDLE} failed: KaggleApiHTTPError"


def test_a_corrupted_kaggle_download_is_one_line(tmp_path, fake_dataset_download):
    error = DataCorruptionError("The X-Goog-Hash header indicated a MD5 checksum of:\n\n  abc\n")

    message = _kaggle_error(tmp_path, error, fake_dataset_download)

    assert "corrupted" in message


def test_an_offline_fetch_leaves_the_previous_data_alone(kaggle_zip, destination, fake_dataset_download):
    fetch(kaggle_zip, destination)
    _, behaviour = fake_dataset_download
    behaviour["error"] = OSError("Network is unreachable")

    message = one_line_error(destination, "kaggle")

    assert message.startswith("cannot reach Kaggle")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/truncated.zip`` promises more bytes than it sends."""

    def do_GET(self) -> None:
        if self.path == "/truncated.zip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04" + b"\x00" * 96)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A folder served on 127.0.0.1 by a thread; yields (base URL, folder)."""
    served = tmp_path / "served"
    served.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(served), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ANY_PIN = "#sha256=" + "0" * 64  # plain http needs a pin; these tests fail before the hash is compared


def test_an_http_url_of_a_zip_is_downloaded_and_installed(kaggle_zip, destination, http_folder):
    base, served = http_folder
    shutil.copy(kaggle_zip, served / "chest.zip")

    fetch(f"{base}/chest.zip#sha256={sha256_of(kaggle_zip)}", destination)

    assert tree_snapshot(destination) == zip_snapshot(kaggle_zip)
    assert leftovers(destination) == []


def test_an_http_404_names_the_url(destination, http_folder):
    base, _ = http_folder

    message = one_line_error(destination, f"{base}/missing.zip{ANY_PIN}")

    assert message.startswith(f"cannot download {base}/missing.zip{ANY_PIN}: HTTP Error 404")


def test_an_http_page_that_is_not_a_zip_is_rejected(destination, http_folder):
    base, served = http_folder
    (served / "login.html").write_text("<html>Please log in</html>")

    message = one_line_error(destination, f"{base}/login.html{ANY_PIN}")

    assert message == f"cannot download {base}/login.html{ANY_PIN}: the server sent an HTML page, not a zip (a login or " \
        "error page? use a direct download link)"


def test_a_download_cut_short_is_one_line(destination, http_folder):
    base, _ = http_folder

    message = one_line_error(destination, f"{base}/truncated.zip{ANY_PIN}")

    assert message.startswith(f"cannot download {base}/truncated.zip{ANY_PIN}: ")


def test_an_unreachable_url_names_the_url(destination):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip{ANY_PIN}"

    message = one_line_error(destination, url)

    assert message.startswith(f"cannot download {url}: ")


@pytest.mark.parametrize(
    "make_source",
    [
        lambda tmp: tmp / "missing.zip",
        lambda tmp: make_kaggle_tree(tmp / "bad", per_class=1, splits=("train",)),
        lambda tmp: make_kaggle_tree(tmp / "bad", per_class={"COVID19": 1}),
    ],
    ids=["missing-path", "missing-test-split", "empty-class"],
)
def test_a_failed_fetch_keeps_existing_data_unchanged(tmp_path, kaggle_zip, destination, make_source):
    fetch(kaggle_zip, destination)
    before = tree_snapshot(destination)

    one_line_error(destination, make_source(tmp_path))

    assert tree_snapshot(destination) == before


def test_a_second_fetch_replaces_the_first_completely(tmp_path, destination):
    first = make_kaggle_tree(tmp_path / "first", per_class=3, seed=1)
    second = make_kaggle_tree(tmp_path / "second", per_class=2, seed=2)
    fetch(first, destination)
    assert tree_snapshot(destination) == tree_snapshot(first)

    fetch(second, destination)

    assert tree_snapshot(destination) == tree_snapshot(second)
    assert not (destination / "train" / "COVID19" / "covid19_002.jpg").exists()
    assert leftovers(destination) == []
