"""Failures back off: when a failed declarative step (or a delete) is tried again. Pure.

A one-shot `spec.action` is answered once and never retried; a declarative step (the spec
says Running, the image is X) is retried until it succeeds, exponentially slower up to a
cap, as client-go's rate-limited work queue does (ItemExponentialFailureRateLimiter). A spec
change is a new request (the generation is in its id) and is tried at once.
"""
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..api.models import Backoff, VirtualInstanceStatus


@dataclass(frozen=True)
class BackoffPolicy:
    base_s: float = 10.0
    cap_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"backoff needs 0 < base <= cap (got {self.base_s}, {self.cap_s})")

    def delay_s(self, failures: int) -> float:
        """Seconds before the next try after `failures` failures in a row (10, 20, 40 ... 300)."""
        return min(self.cap_s, self.base_s * 2 ** min(max(failures - 1, 0), 32))


def after_failure(status: VirtualInstanceStatus, request_id: str, error: str, now: datetime,
                  policy: BackoffPolicy) -> Backoff:
    """The backoff record once `request_id` failed (again)."""
    previous = status.backoff
    failures = previous.failures + 1 if previous and previous.request == request_id else 1
    return Backoff(request=request_id, failures=failures, lastError=error,
                   nextRetryAt=now + timedelta(seconds=policy.delay_s(failures)))


def waiting(status: VirtualInstanceStatus, request_id: str, now: datetime) -> float | None:
    """Seconds until `request_id` may be tried again, or None when it may be tried now."""
    backoff = status.backoff
    if backoff is None or backoff.request != request_id or now >= backoff.nextRetryAt:
        return None
    return (backoff.nextRetryAt - now).total_seconds()
