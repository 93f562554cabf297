"""Entry-point wrapper shared by the stage scripts and ``cxr-predict``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from cxr.errors import PipelineError


def run(main: Callable[[], None]) -> None:
    """Run ``main``; a :class:`PipelineError` becomes one line on stderr and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
