"""Bring a local zip's or folder's files into a work folder, refusing what could harm the machine.

Everything is checked before the first byte is written: a zip's member count, declared sizes
(total, and the ratio to the packed size per member) and names; a folder's symbolic links; then
the free disk space. ``zipfile`` never lets a member grow past its declared size (it stops and
fails the CRC check), so checking the declared sizes bounds what is written. Extraction streams
each member in 1 MiB pieces, so memory stays small whatever the zip holds.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from cxr.data.sources import RATIO_FLOOR_BYTES, SourceLimits, ensure_free_space, human_size
from cxr.errors import PipelineError, first_line

CHUNK_BYTES = 2**20
END_RECORD_SEARCH = 22 + 0xFFFF  # the end record (22 bytes) may be followed by a comment of up to 64 KiB
DIRECTORY_BYTES_PER_MEMBER = 1024  # a member's directory entry is 46 bytes plus its name, extra field and comment
ENCRYPTED = 0x1  # general purpose flag bit 0: the member is encrypted (ZipCrypto or AES)
DRIVE = re.compile(r"^[A-Za-z]:")


def extract_zip(archive: Path, target: Path, shown: str, limits: SourceLimits) -> Path:
    """Unpack ``archive`` (named ``shown`` in messages: its path, or the URL it came from) into ``target``."""
    _check_directory_size(archive, shown, limits)
    try:
        with zipfile.ZipFile(archive) as zf:
            folders, files = _checked_members(zf, shown, limits)
            ensure_free_space(target.parent, sum(info.file_size for info, _ in files), shown)
            for folder in folders:
                (target / folder).mkdir(parents=True, exist_ok=True)
            for info, relative in files:
                _extract_member(zf, info, target / relative, shown)
    # Damaged data surfaces as zlib.error or EOFError while reading a member.
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise PipelineError(f"{shown} is not a valid zip file ({first_line(err)})") from None
    target.mkdir(exist_ok=True)
    return target


def _check_directory_size(archive: Path, shown: str, limits: SourceLimits) -> None:
    """Refuse a zip whose end record declares too many members, before ``zipfile`` reads its whole directory into memory."""
    declared = _declared_directory(archive)
    if declared is None:
        return  # no readable end record: zipfile will say what is wrong
    members, size = declared
    if members > limits.max_entries:
        raise PipelineError(f"{shown}: {members:,} members, more than the {limits.max_entries:,} allowed "
                            "(far more files than a chest film set holds)")
    if size > limits.max_entries * DIRECTORY_BYTES_PER_MEMBER:
        raise PipelineError(f"{shown}: its table of contents takes {human_size(size)}, more than "
                            f"{limits.max_entries:,} members need; not a zip to unpack")


def _declared_directory(archive: Path) -> tuple[int, int] | None:
    """(members, central directory bytes) from the zip's end record (the zip64 one when present), or None."""
    with archive.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - END_RECORD_SEARCH))
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        members, directory = struct.unpack_from("<HI", tail, at + 10)
        if members != 0xFFFF and directory != 0xFFFFFFFF:
            return members, directory
        if at < 20 or tail[at - 20:at - 16] != b"PK\x06\x07":  # zip64 end record locator
            return None
        handle.seek(struct.unpack_from("<Q", tail, at - 12)[0])
        record = handle.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            return None
        return struct.unpack_from("<QQ", record, 32)


def _checked_members(zf: zipfile.ZipFile, shown: str, limits: SourceLimits) -> tuple[list[PurePosixPath], list]:
    """The folders to create and the (member, relative path) pairs to write, after every check."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise PipelineError(f"{shown}: {len(infos):,} members, more than the {limits.max_entries:,} allowed "
                            "(far more files than a chest film set holds)")
    folders: set[PurePosixPath] = set()
    files: dict[PurePosixPath, zipfile.ZipInfo] = {}
    for info in infos:
        relative = _member_path(info, shown, limits)
        if relative is None:
            continue
        if info.is_dir():
            folders.add(relative)
        elif relative in files:
            raise PipelineError(f"{shown}: member {info.filename} appears twice; keep one copy")
        else:
            files[relative] = info
    total = sum(info.file_size for info in files.values())
    if total > limits.max_bytes:
        raise PipelineError(f"{shown}: unpacks to {human_size(total)}, more than the {human_size(limits.max_bytes)} "
                            "allowed (a decompression bomb, or not a chest film set)")
    _refuse_path_conflicts(files, folders, shown)
    needed = folders | {parent for relative in files for parent in relative.parents if parent.parts}
    in_zip_order = sorted(files.items(), key=lambda item: item[1].header_offset)  # sequential reads of the archive
    return sorted(needed), [(info, relative) for relative, info in in_zip_order]


def _member_path(info: zipfile.ZipInfo, shown: str, limits: SourceLimits) -> PurePosixPath | None:
    """The member's path inside the target (``None`` for ``./``), refusing what is unsafe or unreadable."""
    name = info.filename
    if info.flag_bits & ENCRYPTED:
        raise PipelineError(f"{shown}: member {name} is encrypted; unzip it with its password and use the folder")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise PipelineError(f"{shown}: member {name} is a symbolic link; zip the files it points to instead")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or DRIVE.match(name) or ".." in parts:
        raise PipelineError(f"{shown}: member {name} would be written outside the folder it is unpacked into "
                            "(an absolute path or ..); refusing the zip")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        raise PipelineError(f"{shown}: member {name} uses compression method {info.compress_type}, which Python cannot "
                            "read (Deflate64?); re-zip it with plain deflate")
    if (info.file_size > RATIO_FLOOR_BYTES
            and info.file_size > limits.max_ratio * max(info.compress_size, 1)):
        ratio = info.file_size / max(info.compress_size, 1)
        raise PipelineError(f"{shown}: member {name} unpacks {ratio:,.0f}x ({human_size(info.compress_size)} to "
                            f"{human_size(info.file_size)}), above the {limits.max_ratio:g}x allowed: a decompression bomb")
    return PurePosixPath(*parts) if parts else None


def _refuse_path_conflicts(files: dict[PurePosixPath, zipfile.ZipInfo], folders: set[PurePosixPath], shown: str) -> None:
    """Refuse a member that needs a folder where another member is a file (``a.png`` and ``a.png/b.png``)."""
    for relative, info in files.items():
        if relative in folders:
            raise PipelineError(f"{shown}: member {info.filename} is a file, but the zip also lists it as a folder")
        for parent in relative.parents:
            if parent in files:
                raise PipelineError(f"{shown}: member {info.filename} needs a folder {parent}, but member "
                                    f"{files[parent].filename} is a file of that name")


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, shown: str) -> None:
    try:
        with zf.open(info) as member, target.open("xb") as out:
            shutil.copyfileobj(member, out, CHUNK_BYTES)
    except zipfile.BadZipFile:
        raise PipelineError(f"{shown}: corrupt zip member {info.filename}") from None
    except (RuntimeError, NotImplementedError) as err:  # encryption or a method zipfile cannot read
        raise PipelineError(f"{shown}: cannot read member {info.filename} ({first_line(err)})") from None
    except OSError as err:
        raise PipelineError(f"{shown}: cannot write member {info.filename} ({err.strerror or first_line(err)})") from None


def copy_folder(source: Path, target: Path, key: str) -> Path:
    """Copy the folder ``source`` (as the user wrote it) into ``target``, following only links that stay inside it.

    A broken link, a link loop, a link that leads outside ``source`` and anything that is neither a
    file nor a folder (a FIFO would block the copy) are refused with one line naming the link; the
    whole tree is checked before anything is copied.
    """
    folders, files = _plan_copy(Path(source), key)
    ensure_free_space(target.parent, sum(size for _, _, size in files), f"{key} {str(source)!r}")
    for relative in folders:
        (target / relative).mkdir(parents=True, exist_ok=True)
    for real, relative, _ in files:
        try:
            shutil.copy2(real, target / relative)
        except OSError as err:
            raise PipelineError(f"{key}: cannot copy {Path(source) / relative} ({err.strerror or first_line(err)})") from None
    return target


def _plan_copy(source: Path, key: str) -> tuple[list[Path], list[tuple[Path, Path, int]]]:
    """Folders to create and (real file, relative path, size) to copy, walking ``source`` without copying yet."""
    root = source.resolve()
    folders: list[Path] = []
    files: list[tuple[Path, Path, int]] = []
    todo = [(root, Path(), (root,))]
    while todo:
        folder, relative, chain = todo.pop()
        folders.append(relative)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            raise PipelineError(f"{key}: cannot read folder {source / relative} ({err.strerror})") from None
        for entry in entries:
            here = relative / entry.name
            real = _follow(Path(entry.path), source / here, root, chain, key) if entry.is_symlink() else Path(entry.path)
            mode = real.stat().st_mode
            if stat.S_ISDIR(mode):
                todo.append((real, here, (*chain, real)))
            elif stat.S_ISREG(mode):
                files.append((real, here, real.stat().st_size))
            else:
                raise PipelineError(f"{key}: {source / here} is neither a file nor a folder (a FIFO, socket or device)")
    return folders, files


def _follow(link: Path, shown: Path, root: Path, chain: tuple[Path, ...], key: str) -> Path:
    """Where the symbolic link ``link`` (shown as ``shown``) leads, if it stays inside ``root`` without a loop."""
    try:
        real = link.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop as RuntimeError
        raise PipelineError(f"{key}: symbolic link {shown} loops (it leads back to itself)") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PipelineError(f"{key}: symbolic link {shown} loops (it leads back to itself)") from None
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            target = os.readlink(link)
            raise PipelineError(f"{key}: symbolic link {shown} is broken (its target {target} does not exist)") from None
        raise PipelineError(f"{key}: cannot follow symbolic link {shown} ({err.strerror})") from None
    if not real.is_relative_to(root):
        raise PipelineError(f"{key}: symbolic link {shown} leads outside the source folder (to {real}); copy the file "
                            "in instead")
    if real in chain:
        raise PipelineError(f"{key}: symbolic link {shown} leads back to a folder that holds it, a loop")
    return real
