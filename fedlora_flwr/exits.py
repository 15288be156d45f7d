"""Why a run failed: the ServerApp's failures, each a Flower ``AppExitException`` with its own code.

Flower records a ServerApp that raises one as a failed run (``flwr ls``: ``finished:failed``, the
exception's message in the status details) and logs ``Exit Code: <exit_code>``. Flower reserves
exit codes 0-899 for its own components (``flwr.supercore.exit.ExitCode``; 0-99 count as
success), so each failure here has ``exit_code = 900 + status``, where ``status`` is the exit
status of ``fedlora-flwr run`` (a process exit status has 8 bits):

======  =========  ====================  ==================================================
status  exit_code  failure               when
======  =========  ====================  ==================================================
2       902        ``config-error``      the run config, dataset or model cannot be used
3       903        ``node-wait-timeout`` fewer SuperNodes than needed within node-wait-timeout
4       904        ``no-valid-replies``  a round in which no client sent a valid train reply
5       905        ``state-error``       a checkpoint or state file is unreadable or does not fit
6       906        ``privacy-budget``    the next round would spend more than dp-target-epsilon
======  =========  ====================  ==================================================

The message starts with ``[fedlora-flwr exit <status>]``, which :func:`status_in` finds again in
the run's status details. Any other failure of a run (a Flower error, a bug, a stopped run) is
status 1 for ``fedlora-flwr run``.
"""

from __future__ import annotations

import re
from typing import ClassVar

from flwr.app.exception import AppExitException
from flwr.serverapp.exception import PrivacyBudgetExhausted as FlowerPrivacyBudgetExhausted

#: Flower's exit codes are below this (``flwr.supercore.exit.ExitCode``).
FLOWER_RESERVED = 900
#: ``fedlora-flwr run``'s status for a failed run that is none of the failures below.
OTHER_FAILURE = 1
MARKER = re.compile(r"\[fedlora-flwr exit (\d+)\]")


class RunFailure(AppExitException):
    """A failure of the run with a known cause; subclasses set ``status`` and ``kind``."""

    exit_code = FLOWER_RESERVED  # Flower requires one on every class; each failure sets 900 + status
    status: ClassVar[int]
    kind: ClassVar[str]  # summary.json's "failure"

    def __init__(self, reason: str) -> None:
        super().__init__(f"[fedlora-flwr exit {self.status}] {reason}")
        self.reason = reason


class RunConfigError(RunFailure):
    """The run config, the dataset or the model cannot be used; nothing was sent to a client."""

    status, kind = 2, "config-error"
    exit_code = FLOWER_RESERVED + 2


class FederationIncomplete(RunFailure):
    """Fewer SuperNodes than ``min-available-nodes`` connected within ``node-wait-timeout``."""

    status, kind = 3, "node-wait-timeout"
    exit_code = FLOWER_RESERVED + 3


class NoValidReplies(RunFailure):
    """A round in which no client sent a train reply that could be averaged."""

    status, kind = 4, "no-valid-replies"
    exit_code = FLOWER_RESERVED + 4


class RunStateError(RunFailure):
    """A checkpoint or a state file is unreadable or does not match the run."""

    status, kind = 5, "state-error"
    exit_code = FLOWER_RESERVED + 5


class PrivacyBudgetExhausted(RunFailure, FlowerPrivacyBudgetExhausted):
    """The next round's release would take ε past ``dp-target-epsilon`` (strategies/privacy.py):
    the run stops before that round's training. Also Flower's ``PrivacyBudgetExhausted``."""

    status, kind = 6, "privacy-budget"
    exit_code = FLOWER_RESERVED + 6


FAILURES = (RunConfigError, FederationIncomplete, NoValidReplies, RunStateError, PrivacyBudgetExhausted)


def status_in(details: str) -> int | None:
    """The status of the :class:`RunFailure` whose message is in ``details`` (a run's status
    details), or None when there is none."""
    match = MARKER.search(details)
    return int(match.group(1)) if match else None
