"""The one base of every error the platform raises on purpose.

A `WudaoError`'s message is one line that names the thing that went wrong and the fix; the CLI prints it as
`error: <message>` with exit code 1 and keeps the cause for `WUDAO_DEBUG=1` tracebacks. Anything that is not a
`WudaoError` reaching the CLI is a bug, printed with its type. Each part keeps its own subclass where it is
raised (`StorageError`, `IngestError`, `TrainError`, ...), so callers can catch one part's failures alone.
"""

from __future__ import annotations


class WudaoError(RuntimeError):
    """A failure the platform names: one line with the thing and the fix."""
