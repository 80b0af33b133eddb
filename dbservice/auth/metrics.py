"""The auth service's metrics (docs/operations.md lists them), counted by one aiohttp
middleware from each answer's status: the handlers stay as they are. Labels are bounded:
``endpoint`` is one of :data:`ENDPOINTS`, ``outcome`` one of :data:`OUTCOMES`."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

ENDPOINTS = {
    "/v1/login": "password",
    "/v1/login/aws": "aws",
    "/v1/join": "join",
    "/v1/renew": "renew",
}
"""Counted POST endpoints -> their ``endpoint`` label."""
OUTCOMES = ("ok", "denied", "rate_limited", "bad_request", "unavailable", "error")


def outcome(status: int) -> str:
    if status < 300:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "unavailable"
    if 400 <= status < 500:
        return "bad_request"
    return "error"


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.logins = Counter(
            "fleetgate_auth_logins",
            "Login, join and renewal requests by endpoint (password, aws, join, renew) and "
            "outcome (ok, denied, rate_limited, bad_request, unavailable, error)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.certificates = Counter(
            "fleetgate_auth_certificates_issued",
            "Certificates issued, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.rate_limited = Counter(
            "fleetgate_auth_rate_limited_requests",
            "Requests answered 429 (too many failed attempts)",
            registry=r,
        )
        for endpoint in ENDPOINTS.values():
            self.certificates.labels(endpoint)
            for name in OUTCOMES:
                self.logins.labels(endpoint, name)

    def middleware(self) -> Any:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            endpoint = ENDPOINTS.get(request.path) if request.method == "POST" else None
            if endpoint is None:
                return await handler(request)  # type: ignore[no-any-return]
            try:
                response: web.StreamResponse = await handler(request)
            except web.HTTPException as exc:
                self._count(endpoint, exc.status)
                raise
            self._count(endpoint, response.status)
            return response

        return count

    def _count(self, endpoint: str, status: int) -> None:
        result = outcome(status)
        self.logins.labels(endpoint, result).inc()
        if result == "ok":
            self.certificates.labels(endpoint).inc()
        elif result == "rate_limited":
            self.rate_limited.inc()
