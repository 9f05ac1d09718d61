"""Shared command-line plumbing: --help, one-line errors with exit code 2, quiet third-party logging."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from omegaconf.errors import OmegaConfBaseException

from mend.errors import MendError


def quiet_libraries() -> None:
    """Keep a command's stdout for its own output: no download bars or advisory warnings from libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=os.environ.get("MEND_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")


def run(main: Callable[[list[str]], int | None], usage: str, argv: list[str] | None = None) -> None:
    """Run a command's ``main``; ``--help`` prints ``usage``; user errors print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage.strip())
        sys.exit(0)
    try:
        quiet_libraries()
        code = main(argv)
    except MendError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as e:
        from mend.config import omega_message

        print(f"error: {omega_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system said no (a path too long, permission denied, disk full): no bug of ours
        where = f": {str(e.filename)[:200]}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
