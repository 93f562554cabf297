"""Which files in a class folder are images to decode: every regular file but hidden files and OS junk.

Kept apart from :mod:`cxr.data.images` (the decoders) because ``download`` checks class
folders with it: the download stage then depends on this small module only, and an edit to
the decoders does not refetch the data set.
"""

from pathlib import Path

JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
"""Lower-case names of files that operating systems drop into folders; never images."""


def is_candidate_image(path: Path) -> bool:
    """Whether a file found in a class folder should be decoded at all.

    Hidden files and OS junk are skipped silently; every other regular file is a candidate,
    whatever its suffix, so a corrupt or misnamed image fails decoding with a reason instead
    of silently vanishing from the data set.
    """
    name = path.name
    if name.startswith(".") or name.lower() in JUNK_NAMES:
        return False
    return path.is_file()
