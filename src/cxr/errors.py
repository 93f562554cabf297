"""One exception type for every problem a user can fix.

Stage scripts catch :class:`PipelineError` and print its message as a single line, so
users see what is wrong and where instead of a traceback from deep inside a library.
"""


class PipelineError(Exception):
    """A problem with the user's data, params or environment, worded for the user."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class ImageDecodeError(PipelineError):
    """An image file that cannot be turned into pixels; the message names the file and why."""
