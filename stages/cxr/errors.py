"""One exception type for every problem a user can fix.

Stage scripts catch :class:`PipelineError` and print its message as a single line, so
users see what is wrong and where instead of a traceback from deep inside a library.
"""


class PipelineError(Exception):
    """A problem with the user's data, params or environment, worded for the user."""


class ImageDecodeError(PipelineError):
    """An image file that cannot be turned into pixels; the message names the file and why."""
