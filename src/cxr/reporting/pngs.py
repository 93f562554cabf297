"""The one way a PNG of this project is written: atomically, and byte-identical for the same drawing.

Figures are DVC outputs. matplotlib's default PNG carries a "Software" text chunk with the
matplotlib version, so an upgrade alone would change every file and make DVC (and the
report's git history) see changes where there are none. Each PNG is therefore written
without that chunk, at the dpi the caller fixes, through :func:`cxr.files.atomic_write`
so a killed stage never leaves half a file, and the figure is always closed: pyplot keeps
every open figure alive, and a stage drawing many of them would grow without bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cxr.files import atomic_write  # noqa: E402

# PNG text chunks matplotlib would add; "Software" carries the matplotlib version. PNGs get no date chunk.
PNG_METADATA: dict[str, str | None] = {"Software": None}


def save_png(figure: Figure, path: Path, dpi: int) -> None:
    """Write ``figure`` to ``path`` (parent folders created) and close it, even if writing fails."""
    try:
        atomic_write(Path(path), lambda tmp: figure.savefig(tmp, dpi=dpi, format="png", metadata=PNG_METADATA))
    finally:
        plt.close(figure)


@contextmanager
def png_figure(path: Path, dpi: int, n_rows: int = 1, n_cols: int = 1, **subplots: Any) -> Iterator[tuple[Figure, np.ndarray]]:
    """A new figure with a 2-D grid of axes, saved by :func:`save_png` when the block ends.

    ``subplots`` go to :func:`matplotlib.pyplot.subplots` (``figsize``, ``layout``...). If
    the block raises, nothing is written (an earlier file at ``path`` is left as it was)
    and the figure is still closed.
    """
    figure, axes = plt.subplots(n_rows, n_cols, squeeze=False, **subplots)
    try:
        yield figure, axes
    except BaseException:
        plt.close(figure)
        raise
    save_png(figure, path, dpi)
