"""The one exception type users see: a one-line problem plus the fix.

The underlying exception stays chained (`raise OpenkdError(...) from err`); `--debug` or
`OPENKD_TRACEBACK=1` prints that chain above the one-line message.
"""

from __future__ import annotations

import os

TRACEBACK_ENV = "OPENKD_TRACEBACK"


class OpenkdError(Exception):
    """A user-facing failure. `str(err)` is printed as one line and the process exits non-zero."""

    exit_code = 1


class ConfigError(OpenkdError):
    """Bad configuration or flags, found before any expensive work starts."""

    exit_code = 2


# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): distinct from
# 130/143 (stopped or killed by a signal, nothing saved for it) and from errors (1, 2).
PREEMPTED = 75


class Preempted(OpenkdError):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; a rerun resumes from it.
    Not a failure: printed as an info line, and the exit code tells schedulers to requeue."""

    exit_code = PREEMPTED

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(
            f"preempted at step {step}: checkpoint saved to {checkpoint}; rerun the same "
            "command to resume"
        )
        self.step = step
        self.checkpoint = checkpoint


class PreemptedBeforeStart(Preempted):
    """SIGTERM/SIGUSR1 before the first optimizer step: nothing to save, the rerun starts over
    (or resumes from an earlier run's checkpoint). Exit code 75, like any preemption."""

    def __init__(self) -> None:
        OpenkdError.__init__(
            self, "preempted before the first step: nothing to save; rerun the same command"
        )
        self.step = 0
        self.checkpoint = ""


def brief(err: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, clipped: library messages can be pages long."""
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_tracebacks() -> bool:
    """True when the user asked for the traceback behind one-line errors."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
