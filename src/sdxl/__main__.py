import os
import sys

EXIT_INTERRUPTED = 130  # as sdxl.interfaces.errors says it


def _exit(status: int) -> None:
    """End `python -m sdxl` with `status`. After Ctrl-C through os._exit: CPython can keep its "KeyboardInterrupt
    unhandled" flag set after ours was handled (seen when it arrives while torch imports), and `python -m` would then
    end by SIGINT (returncode -2) instead of exiting 130. Everything of ours was cleaned up before we got here."""
    if status != EXIT_INTERRUPTED:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe: nothing more to say
            pass
    os._exit(EXIT_INTERRUPTED)


try:
    from .interfaces.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported
    print("sdxl: interrupted", file=sys.stderr)
    _exit(EXIT_INTERRUPTED)

_exit(main())
