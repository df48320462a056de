"""Which worker failures Ray Train may retry.

``FailureConfig(max_failures=N)`` restarts the worker group after any worker error, which is right for a
dead process or a lost node and wrong for an error in the inputs: a corrupt shard, a label out of range
or a bad model file fails the same way on every attempt, and each retry costs a full stage. Here such
errors are ``ValueError`` (``ShardError``, ``ModelFileError``, ...). Ray Train (2.60, Train V2) has no
per-exception retry setting; its default failure policy retries a ``WorkerGroupError`` but raises a
``ControllerError`` whose failure is not a worker-group start-up problem. :class:`InputErrorsAreFinal`, a
``UserCallback`` run on the controller when a poll finds worker errors, turns input errors into
:class:`InputError` (a ``ControllerError``) so the run ends at once, with the workers' exceptions kept for
the driver's one-line message.
"""

from __future__ import annotations

from ray.train import ControllerError, UserCallback


def is_input_error(error: BaseException) -> bool:
    """Whether a worker's exception (inside Ray's wrappers) is a ValueError: a problem of the inputs."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ValueError):
            return True
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__
    return False


class InputError(ControllerError):
    """Workers failed on their inputs; `worker_failures` (rank -> exception) as in a ``WorkerGroupError``."""

    def __init__(self, worker_failures: dict[int, BaseException]) -> None:
        super().__init__(worker_failures[min(worker_failures)])
        self.worker_failures = worker_failures

    def __reduce__(self):
        return (self.__class__, (self.worker_failures,))


class InputErrorsAreFinal(UserCallback):
    """Ends the run without a retry when a worker fails on its inputs (see the module's docstring)."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        final = {rank: e for rank, e in worker_exceptions.items() if is_input_error(e)}
        if final:
            raise InputError(final)
