"""The one base class of the errors the project raises for bad input.

A config, a corpus, token files, a checkpoint, fits or a CLI argument that cannot work raises a
subclass of :class:`InputError` whose message names the problem and the fix. The CLI prints such
an error as one ``error: ...`` line and exits 2, with no traceback; any other exception is a bug
and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input; the message names the problem and the fix."""
