"""The one place where an expected failure becomes one line on stderr and an exit status.

`run(command, fn)` runs a command and maps what it raises, by the first matching row of ERRORS:

    what                                         exit  stderr
    Ctrl-C (KeyboardInterrupt), at any moment     130   "sdxl CMD: interrupted"
    stdout closed early (`sdxl samplers | head`)  141   nothing
    out of memory (host or GPU)                     2   "sdxl CMD: error: out of memory ...; what to try"
    a safetensors file the library refused         2   "sdxl CMD: error: a safetensors file ...: its reason"
    an image over PIL's decompression-bomb limit    2   "sdxl CMD: error: ... --max-image-pixels"
    text that is not UTF-8 (UnicodeError)           2   "sdxl CMD: error: ... not valid UTF-8 ..."
    our own errors (ValueError, CheckpointError,    2   "sdxl CMD: error: MESSAGE" (they name the file, flag
      OutputError, FileNotFoundError(message))            or field, and what is allowed)
    an operating-system error (OSError)             2   "sdxl CMD: error: FILE: REASON"

Messages are joined to one line. Anything else is a bug, and keeps its traceback. (Exit status 2 is also
argparse's, for a malformed command line.) The rows match exception classes by name where the class lives in a
heavy library (torch, safetensors, PIL), so that this module imports nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

EXIT_ERROR = 2  # the command could not do what was asked; the one line says why
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, how other Unix tools end when their reader goes away

MEMORY_HINT = ("try a smaller --width/--height or --batch, --vae-tiling, --offload model, or --dtype fp16 / bf16 "
               "(on a GPU)")


def one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _named(e: BaseException, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(e).__mro__)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return (isinstance(e, MemoryError) or _named(e, "OutOfMemoryError")
            or (isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)))


def _memory_line(e: BaseException) -> str:
    detail = one_line(e)
    return f"out of memory{f' ({detail[:200]})' if detail else ''}: {MEMORY_HINT}"


def _unicode_line(e: UnicodeError) -> str:
    if isinstance(e, (UnicodeDecodeError, UnicodeEncodeError)):
        return f"text that is not valid UTF-8 ({e.reason} at position {e.start})"
    return one_line(e)


OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for this file system (or a size limit)",
}


def os_line(e: OSError) -> str:
    """FILE: REASON for an operating-system error (our own FileNotFoundError(message) keeps its message)."""
    if e.errno is None or not e.strerror:
        return one_line(e)
    reason = OS_REASONS.get(e.errno, e.strerror[:1].lower() + e.strerror[1:])
    where = e.filename if e.filename is not None else None
    if where is None:
        return reason
    return f"{os.fsdecode(where)}: {reason}" + (f" (to {os.fsdecode(e.filename2)})" if e.filename2 else "")


# (matches, exit status, the line; None: nothing to say), first match wins.
ERRORS: tuple[tuple[Callable[[BaseException], bool], int, Callable[[BaseException], str | None]], ...] = (
    (lambda e: isinstance(e, KeyboardInterrupt), EXIT_INTERRUPTED, lambda e: "interrupted"),
    (lambda e: isinstance(e, BrokenPipeError), EXIT_BROKEN_PIPE, lambda e: None),
    (_out_of_memory, EXIT_ERROR, _memory_line),
    (lambda e: _named(e, "SafetensorError"), EXIT_ERROR,
     lambda e: f"a safetensors file could not be read or written ({one_line(e)})"),
    (lambda e: _named(e, "DecompressionBombError"), EXIT_ERROR,
     lambda e: f"{one_line(e)}; --max-image-pixels N reads larger images"),
    (lambda e: isinstance(e, UnicodeError), EXIT_ERROR, _unicode_line),
    (lambda e: isinstance(e, ValueError), EXIT_ERROR, one_line),
    (lambda e: isinstance(e, OSError), EXIT_ERROR, os_line),
)


def describe(e: BaseException) -> tuple[int, str | None] | None:
    """(exit status, one line or None) for an expected failure; None for anything else (a bug)."""
    for matches, status, line in ERRORS:
        if matches(e):
            return status, line(e)
    return None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (tests' captured stdout)
        pass


def run(label: str, fn: Callable[[], int]) -> int:
    """fn()'s exit status; an expected failure is written as one line starting with `label` ("sdxl generate")
    and gets its exit status (see ERRORS); anything else is re-raised."""
    try:
        return fn()
    except (Exception, KeyboardInterrupt) as e:
        described = describe(e)
        if described is None:
            raise
        status, line = described
        if status == EXIT_BROKEN_PIPE:
            _silence_stdout()
        if line is not None:
            _say(f"{label}: " if status == EXIT_INTERRUPTED else f"{label}: error: ", line)
        return status


def _say(prefix: str, line: str) -> None:
    """Write the one line, with a second Ctrl-C (while it is written) ignored."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        print(prefix + line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
