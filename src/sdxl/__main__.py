import sys

try:
    from .interfaces.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported
    print("sdxl: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
