"""What every fuzz target shares: the atheris entry point, and the input splitter.

A target module defines ``test_one_input(data: bytes) -> None`` (raise, or let an
exception escape, to report a bug) and ends with::

    if __name__ == "__main__":
        harness.main("tests.fuzz.fuzz_NAME")

(``harness.main("tests.fuzz.fuzz_NAME")``) so that
``python -m tests.fuzz.fuzz_NAME [libFuzzer options] [corpus folders]`` fuzzes it
with atheris.  The targets import nothing of atheris themselves: the CI replays every
committed corpus file through ``test_one_input`` with or without it
(``tests/fuzz/test_fuzz.py``).  ``python -m tests.fuzz.run`` runs them all in turn.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

#: Committed seed inputs, one folder per target (``corpus/<target>/``).
CORPUS = Path(__file__).parent / "corpus"

#: The targets, by the name of their module without ``fuzz_``.
TARGETS = ("commands", "core", "sasl", "passwd", "maildir_names", "mbox", "lmtp", "proxy")


def main(module_name: str) -> None:
    """Fuzz ``module_name``'s ``test_one_input`` with atheris (libFuzzer options in argv).

    The module already ran as ``__main__`` with pop3d imported uninstrumented: pop3d
    (and aiosmtpd, for LMTP) are imported again, fresh, under ``instrument_imports``,
    so that coverage guides the fuzzer through them and not through the whole stdlib
    (``instrument_all`` takes minutes to start).
    """
    import atheris  # noqa: PLC0415 (only the fuzzing run needs it, not the corpus replay)

    # What parsers skip or correct is logged (a malformed passwd line, a damaged mbox):
    # thousands of lines a second.  Errors (exceptions) still show, and reach handlers.
    for name in (*_INSTRUMENTED, "mail.log"):
        logging.getLogger(name).setLevel(logging.ERROR)

    for name in list(sys.modules):
        if name.partition(".")[0] in _INSTRUMENTED or (
            name.startswith("tests.") and name not in ("tests.fuzz", __name__)
        ):
            del sys.modules[name]
    with atheris.instrument_imports(include=list(_INSTRUMENTED)):
        module = importlib.import_module(module_name)
    # libFuzzer starts children (-merge, -fork) with a shell command made of argv[0]
    # and the options: argv[0] must run this target again, not name the module's file.
    argv = [f"{sys.executable} -m {module_name}", *sys.argv[1:]]
    atheris.Setup(argv, module.test_one_input)
    atheris.Fuzz()


#: Packages whose code is instrumented for coverage.
_INSTRUMENTED = ("pop3d", "aiosmtpd")


def tolerated(bug: str) -> bool:
    """Whether ``FUZZ_TOLERATE`` (comma-separated) names ``bug``: a known, reported bug
    that a long fuzzing run should step over to explore further.  Never set in CI.
    """
    return bug in os.environ.get("FUZZ_TOLERATE", "").split(",")


class Split:
    """Cuts one fuzzer input into the several values a target needs (byte-oriented).

    Unlike atheris's ``FuzzedDataProvider`` it works without atheris, so that the
    corpus replays identically in CI.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        """The next octet (0 once the input is used up)."""
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def chunk(self, limit: int = 255) -> bytes:
        """A length octet (capped at ``limit``), then that many octets."""
        n = min(self.byte(), limit)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        """Everything not consumed yet."""
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def pieces(self, data: bytes) -> list[bytes]:
        """``data`` cut at points the input chooses (every piece non-empty)."""
        out = []
        i = 0
        while i < len(data):
            n = self.byte() % 64 + 1
            out.append(data[i : i + n])
            i += n
        return out
