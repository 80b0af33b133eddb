"""What an agent's listener calls when a client connects, in order:

1. :func:`trusted_cas` once at start (and on a timer or CA watch): the fleet CA(s) from
   the registry, for :func:`dbservice.access.ca.mtls_server_context` and verification.
2. :func:`dbservice.access.ca.identity_from_ssl` on the accepted TLS connection: who it is
   (raises CertificateRejected: expired, other CA, no identity).
3. :func:`authorize_session`: the roles' current definitions from the registry (so role
   edits apply to the next connection), the access decision for this database and db
   user, and the per-session :class:`~dbservice.access.rbac.CommandPolicy`.
4. Per command: ``grant.commands.check(name)``; audit through
   :class:`dbservice.access.audit.SessionAudit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from bus import Bus
from bus.access import Identity, Role, get_ca, get_roles
from dbservice.access.ca import load_certs
from dbservice.access.rbac import CommandPolicy, Decision, check_db_access


@dataclass(frozen=True)
class SessionGrant:
    """The outcome of :func:`authorize_session`."""

    identity: Identity
    decision: Decision
    commands: CommandPolicy
    """Deny-all when the session is refused."""
    roles: tuple[Role, ...]

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


async def trusted_cas(bus: Bus) -> list[x509.Certificate]:
    """The CA certificates published by ``fleetgate auth init`` (empty when none yet)."""
    record = await get_ca(bus)
    return load_certs(record.pem) if record is not None else []


def grant_for(
    identity: Identity,
    roles: list[Role],
    *,
    database: str,
    labels: Mapping[str, str],
    db_user: str,
) -> SessionGrant:
    """The pure part of :func:`authorize_session`, for callers that cache roles."""
    decision = check_db_access(roles, identity.db_users, labels, db_user, database=database)
    granting = decision.roles if decision.allowed else ()
    commands = CommandPolicy.build(roles, granting=granting)
    return SessionGrant(identity, decision, commands, tuple(roles))


async def authorize_session(
    bus: Bus,
    identity: Identity,
    *,
    database: str,
    labels: Mapping[str, str],
    db_user: str,
) -> SessionGrant:
    """May ``identity`` reach ``database`` (with ``labels``) as ``db_user``? Reads the
    current definitions of the roles named in the certificate."""
    roles = await get_roles(bus, identity.roles)
    return grant_for(identity, roles, database=database, labels=labels, db_user=db_user)
