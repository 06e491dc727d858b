"""The library's warnings in the run logs on the Prefect API.

``mobiquant`` logs what a reviewer should know (experts no calibration token reached, routed layers the threshold
passes did not reach, a re-taken capture) on its own logger, which Prefect's run logs do not collect: only the
console of the process that ran the task saw them, a Dask worker's or a process runner's child's included.
"""

from __future__ import annotations

import logging

# Loading Prefect's main module configures logging (its console handler on the root logger): a handler on the library's
# logger in a process where no handler was set up would otherwise stop Python's last-resort handler from printing the
# library's warnings logged outside a run.
import prefect.main  # noqa: F401
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

LIBRARY_LOGGER = "mobiquant"


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for records logged inside a flow or task run, at warning level and above.

    Outside a run (a test or a script that imported the tasks) a record is left to the other handlers: Prefect's own
    handler would warn there that it has no run to send it to."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            get_run_context()
        except MissingContextError:
            return False
        return bool(super().filter(record))


def send_library_warnings_to_run_logs() -> None:
    """Attach :class:`RunLogHandler` to the library's logger in this process (once)."""
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(handler, RunLogHandler) for handler in library.handlers):
        library.addHandler(RunLogHandler())
