"""What mlflow, as the pinned version (PINNED_VERSION) ships it, is relied on for beyond its documented API,
in one place (tests/test_tracking_live.py fails if the pinned version changes underneath):

- Asynchronous logging (`MlflowClient.log_batch(..., synchronous=False)`) returns a RunOperations whose only
  public method, `wait()`, blocks without a deadline and raises one error for all its batches. Live logging
  needs to wait a bounded time and to know which batch MLflow gave up (to send it again): it reads the
  futures RunOperations keeps (`_operation_futures`). With nothing to log, log_batch returns None.
"""

from __future__ import annotations

PINNED_VERSION = "3.17.2"


def operation_futures(operations) -> list:
    """The concurrent.futures.Future of each batch an asynchronous `log_batch` queued."""
    return list(operations._operation_futures) if operations is not None else []
