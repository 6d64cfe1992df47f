"""`python -m streamprune` and the `streamprune` console script (setup.cfg points at `run`).

The CLI imports torch and transformers (~3 s): a Ctrl-C then must not print a KeyboardInterrupt traceback, so
the import happens here, inside the handler, and this module imports nothing heavy itself."""

import sys

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def run() -> int:
    try:
        from streamprune.cli import main

        return main()
    except KeyboardInterrupt:  # while importing, or before `main` handles it
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(run())
