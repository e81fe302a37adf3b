"""How every command fails on a problem the user can fix: ``error: <message>`` on one line, exit status 1.

The message already names the file, key or id (see msdet.errors); a traceback would only bury it. Set
``MSDET_TRACEBACK=1`` to see it anyway. Anything else (a bug, a framework crash) keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from msdet.errors import UserError

#: what counts as the user's to fix: our own errors, and the ValueError / OSError / KeyError our readers raise
USER_ERRORS = (UserError, ValueError, OSError, KeyError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a KeyError's argument without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``, with a user-fixable error turned into one line on stderr and exit status 1."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if os.environ.get("MSDET_TRACEBACK"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
