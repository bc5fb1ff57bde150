"""Bounded retries for cloud API calls, and the line between transient and permanent errors.

Clouds fail in two ways that need opposite answers. Throttling, 5xx and timeouts go away if
we wait, so we retry with exponential backoff and jitter (never forever: a bounded number of
attempts and an overall deadline). A quota error, bad credentials or an unknown image will
fail identically every time, so retrying only delays the clear message the operator needs.

libcloud raises ``BaseHTTPError`` (with ``.code``) for most HTTP failures, its own
``RateLimitReachedError`` for 429, and lets ``requests`` exceptions through for timeouts and
refused connections; EC2 reports throttling as 503 ``RequestLimitExceeded`` and quota as 400
``InstanceLimitExceeded``; Nova reports quota as 403 "Quota exceeded". All of that is decided
here, in one table, so the provisioner never guesses.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from http.client import HTTPException

import requests.exceptions as _rex  # libcloud talks HTTP through requests: its errors are our timeouts
from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from libcloud.common.types import InvalidCredsError

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    _rex.Timeout,
    _rex.ConnectionError,
    _rex.ChunkedEncodingError,
)

log = logging.getLogger(__name__)

TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
TRANSIENT_MARKERS = (
    "requestlimitexceeded",
    "throttl",
    "rate limit",
    "internalerror",
    "internal error",
    "serviceunavailable",
    "service unavailable",
    "unavailable",
    "insufficientinstancecapacity",
    "dependencyviolation",  # EC2: a group still referenced by instances that are shutting down
    "in use",  # Neutron 409: same, for OpenStack
    "timed out",
    "timeout",
)
PERMANENT_MARKERS = (
    "quota",
    "instancelimitexceeded",
    "vcpulimitexceeded",
    "limitexceeded",  # after requestlimitexceeded was checked
    "unauthorized",
    "authfailure",
    "invalidclienttokenid",
    "signaturedoesnotmatch",
    "not found",
    "notfound",
)


def is_timeout(exc: BaseException) -> bool:
    """The request may still be in flight on the cloud's side (it might yet succeed)."""
    if isinstance(exc, _rex.Timeout):
        return True
    return isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in str(exc).lower()


class Kind(str, Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify(exc: BaseException) -> Kind:
    """Transient if waiting can fix it, permanent otherwise (quota wins over a 5xx status)."""
    if isinstance(exc, InvalidCredsError):
        return Kind.PERMANENT
    if isinstance(exc, RateLimitReachedError):
        return Kind.TRANSIENT
    text = str(exc).lower()
    if "requestlimitexceeded" in text or "throttl" in text:
        return Kind.TRANSIENT
    if any(marker in text for marker in ("quota", "instancelimitexceeded", "vcpulimitexceeded")):
        return Kind.PERMANENT
    if isinstance(exc, BaseHTTPError):
        code = int(getattr(exc, "code", 0) or 0)
        if code in TRANSIENT_STATUS:
            return Kind.TRANSIENT
        if code == 400 and "dependencyviolation" in text:
            return Kind.TRANSIENT
        return Kind.PERMANENT
    if isinstance(exc, _NETWORK_ERRORS):
        return Kind.TRANSIENT
    if isinstance(exc, (socket.timeout, TimeoutError, ConnectionError, HTTPException)):
        return Kind.TRANSIENT
    if any(marker in text for marker in PERMANENT_MARKERS):
        return Kind.PERMANENT
    if any(marker in text for marker in TRANSIENT_MARKERS):
        return Kind.TRANSIENT
    return Kind.PERMANENT


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    deadline_s: float = 600.0

    @classmethod
    def from_mapping(cls, spec: dict | None) -> RetryPolicy:
        spec = spec or {}
        return cls(**{k: spec[k] for k in cls.__dataclass_fields__ if k in spec})

    def delay(
        self, attempt: int, exc: BaseException | None = None, rng: random.Random | None = None
    ) -> float:
        """Exponential backoff with 'equal jitter'; honours Retry-After up to max_delay_s."""
        rng = rng or random
        raw = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        delay = raw / 2 + rng.random() * raw / 2
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            delay = max(delay, min(float(retry_after), self.max_delay_s))
        return delay


class CloudCallError(RuntimeError):
    """A cloud call failed for good: permanent error, or transient ones past the retry budget."""

    def __init__(self, op: str, cause: BaseException, attempts: int, kind: Kind):
        self.op = op
        self.cause = cause
        self.attempts = attempts
        self.kind = kind
        budget = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{op} failed{budget} ({kind.value} error): {redact(describe(cause))}")


def describe(exc: BaseException) -> str:
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{name}{f' {code}' if code else ''}: {text}"


_SECRET_ENV_NAMES: set[str] = set()


def register_secret_env(names: Iterable[str]) -> None:
    """Remember which environment variables hold secrets so every message can be scrubbed."""
    _SECRET_ENV_NAMES.update(n for n in names if n)


def redact(text: str) -> str:
    """Replace the value of any registered secret variable with ``***`` (defence in depth)."""
    for name in _SECRET_ENV_NAMES:
        value = os.environ.get(name)
        if value and len(value) >= 4 and value in text:
            text = text.replace(value, "***")
    return text


class Caller:
    """Runs driver calls under a policy and counts every attempt by operation name.

    The counts are the benchmark's "API calls" and the idempotency test's evidence: an
    unchanged cluster must show ``create_node == 0``.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        logger: logging.Logger | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.policy = policy
        self.log = logger or log
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.calls: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # wall time per operation, retries and waits included

    def __call__(
        self,
        op: str,
        fn: Callable,
        *args,
        before_retry: Callable[[BaseException], object] | None = None,
        **kwargs,
    ):
        """Call ``fn``; on a transient error wait and try again, up to the policy's budget.

        ``before_retry`` runs before each retry and may return a non-None value to end the
        loop with that value: create calls use it to adopt a node whose first request
        timed out on our side but landed on the cloud's.
        """
        started = self.clock()
        try:
            return self._attempts(op, fn, args, kwargs, before_retry, started)
        finally:
            self.seconds[op] += self.clock() - started

    def _attempts(self, op, fn, args, kwargs, before_retry, started):
        attempt = 0
        while True:
            attempt += 1
            self.calls[op] += 1
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # classified below; nothing is swallowed
                kind = classify(exc)
                out_of_time = self.clock() - started > self.policy.deadline_s
                if kind is Kind.PERMANENT or attempt >= self.policy.attempts or out_of_time:
                    self.failures[op] += 1
                    raise CloudCallError(op, exc, attempt, kind) from exc
                delay = self.policy.delay(attempt, exc, self.rng)
                self.retries[op] += 1
                self.log.warning(
                    "%s: transient error (%s); retry %d/%d in %.2fs",
                    op,
                    redact(describe(exc)),
                    attempt,
                    self.policy.attempts - 1,
                    delay,
                )
                self.sleep(delay)
                if before_retry is not None:
                    adopted = before_retry(exc)
                    if adopted is not None:
                        return adopted

    def summary(self) -> dict[str, dict]:
        return {
            "calls": dict(sorted(self.calls.items())),
            "retries": dict(sorted(self.retries.items())),
            "failures": dict(sorted(self.failures.items())),
            "seconds": {op: round(t, 3) for op, t in sorted(self.seconds.items())},
        }
