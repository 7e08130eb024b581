"""The one error type that user-facing commands turn into a one-line message and a non-zero exit."""

import argparse
import sys
from contextlib import contextmanager

__all__ = ["DataError", "exit_on_error", "CommandParser"]


class DataError(ValueError):
    """Bad input from the user: a missing or corrupt file, an unknown name, a spec that disagrees.

    The message names the thing (file, key, record index) and says how to fix it.
    """


@contextmanager
def exit_on_error(prog):
    """Run a command body; a `DataError` (or `ValueError`) becomes ``prog: error: MESSAGE`` and exit status 2.

    Anything already written to stdout is flushed first, so partial output (e.g. episodes sampled
    before a sampler error) is never lost.
    """
    try:
        yield
    except (DataError, ValueError, FileNotFoundError) as err:
        sys.stdout.flush()
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


class CommandParser(argparse.ArgumentParser):
    """The commands' `argparse.ArgumentParser`: a bad command line is one line too, as `exit_on_error` writes
    it (``prog: error: MESSAGE; see prog --help``), and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
