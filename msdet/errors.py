"""The project's base for errors a user can fix from the message alone (a file, a key, an id and the problem).

Every command catches these (and ``ValueError`` / ``OSError``, which the config and data readers raise with
the same kind of message) in :func:`msdet.cli.run` and prints one line instead of a traceback.
"""
from __future__ import annotations


class UserError(RuntimeError):
    """A problem with the input, the environment or a job, named in one line; not a bug in msdet."""
