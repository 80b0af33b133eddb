"""Role-based access checks: pure functions, no I/O.

Rules (deny wins, no role means no access):

* A role **allows** a session when its ``allow.db_labels`` match the database's labels
  (:func:`bus.labels.matches`; an empty selector matches nothing) and the db user matches
  one of its ``allow.db_users`` after ``{{internal.db_users}}`` is replaced by the user's
  own db users (globs such as ``app-*`` work, ``*`` is any).
* A role **denies** a session when its ``deny.db_labels`` match the database, or when the
  db user matches its ``deny.db_users`` (on any database). Denies from every role of the
  user apply, whichever role allowed.
* Commands: allowed when a role that allowed the session allows the command
  (``allow.redis_commands`` absent means every command) and no role of the user denies it
  (``deny.redis_commands``). Names are compared upper-case, with globs.
* A deny names what the command does, not only how it is spelled: denying a command of
  :data:`FAMILIES` denies the commands that do the same under another name (``DEL`` also
  ``UNLINK`` and ``GETDEL``, ``FLUSHALL`` also ``FLUSHDB``, ``KEYS`` also ``SCAN``...).
* Scripts run commands the agent never sees. When a session's roles limit commands (an
  allow list, or any deny), :data:`SCRIPTING` commands are refused unless a role that
  granted the session allows them by their exact name (a glob such as ``*`` does not).
* A name with a NUL byte is refused: the server reads names up to the NUL (it may run
  ``FLUSHALL\\0x`` as ``FLUSHALL``), so no rule could name it.

The per-command check sits on the proxy's command path, so :class:`CommandPolicy`
compiles each side into one regular expression once per session and caches answers.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from bus.access import DB_USERS_TRAIT, DEFAULT_MAX_SESSION_TTL, Role
from bus.labels import matches


@dataclass(frozen=True)
class Decision:
    """The answer of a check; ``reason`` says why, in words a user can act on."""

    allowed: bool
    reason: str
    roles: tuple[str, ...] = ()
    """The roles that allowed it (empty when refused)."""

    def __bool__(self) -> bool:
        return self.allowed


def session_ttl_cap(roles: Sequence[Role]) -> float:
    """The longest certificate holders of ``roles`` may get: the shortest
    ``options.max_session_ttl`` among them (8 hours with no roles)."""
    return min((r.options.max_session_ttl for r in roles), default=DEFAULT_MAX_SESSION_TTL)


def expand_db_users(patterns: Iterable[str], user_db_users: Sequence[str]) -> list[str]:
    """Replace ``{{internal.db_users}}`` by the user's db users; keep other patterns."""
    out: list[str] = []
    for pattern in patterns:
        if pattern.strip() == DB_USERS_TRAIT:
            out.extend(user_db_users)
        else:
            out.append(pattern)
    return out


def _glob_matches(patterns: Iterable[str], value: str) -> bool:
    return any(p == "*" or p == value or fnmatch.fnmatchcase(value, p) for p in patterns)


def check_db_access(
    roles: Sequence[Role],
    user_db_users: Sequence[str],
    db_labels: Mapping[str, str],
    db_user: str,
    *,
    database: str = "the database",
) -> Decision:
    """May a holder of ``roles`` (with db users ``user_db_users``) reach a database with
    ``db_labels`` as ``db_user``? ``roles`` are the current definitions of the roles the
    identity names (unknown names simply absent)."""
    if not roles:
        return Decision(False, "you have no roles, so no database access")
    for role in roles:
        deny = role.deny
        if deny.db_labels and matches(deny.db_labels, db_labels):
            return Decision(False, f"role {role.name} denies access to {database}")
        if deny.db_users and _glob_matches(expand_db_users(deny.db_users, user_db_users), db_user):
            return Decision(False, f"role {role.name} denies db user {db_user!r}")
    reaching = [role for role in roles if matches(role.allow.db_labels, db_labels)]
    if not reaching:
        return Decision(False, f"none of your roles allows access to {database}")
    granting = tuple(
        role.name
        for role in reaching
        if _glob_matches(expand_db_users(role.allow.db_users, user_db_users), db_user)
    )
    if not granting:
        return Decision(False, f"none of your roles allows {database} as db user {db_user!r}")
    return Decision(True, "allowed by role " + ", ".join(granting), granting)


def can_reach(roles: Sequence[Role], db_labels: Mapping[str, str]) -> bool:
    """Whether some role allows a database with ``db_labels`` and none denies it by
    label (db users aside): what ``db ls`` shows a logged-in user."""
    if any(r.deny.db_labels and matches(r.deny.db_labels, db_labels) for r in roles):
        return False
    return any(matches(r.allow.db_labels, db_labels) for r in roles)


SCRIPTING: Final = frozenset(
    {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO", "SCRIPT", "FUNCTION"}
)
"""Commands that run (or load, or flush) server-side code: what a script calls is never
seen by the agent, so a session whose roles limit commands needs them allowed by name."""

_GROUPS: Final = (
    ("DEL", "UNLINK"),
    ("FLUSHALL", "FLUSHDB"),
    ("KEYS", "SCAN"),
    ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"),
    ("REPLICAOF", "SLAVEOF"),
    ("GETRANGE", "SUBSTR"),
    ("HSET", "HMSET"),
)
"""Commands that do the same thing under other names: a deny of one denies them all."""
_ALSO: Final = {"GETDEL": ("DEL", "UNLINK")}
"""Commands that do what another does and more: denied with it (not the other way)."""


def _families() -> Mapping[str, tuple[str, ...]]:
    out = {name: tuple(n for n in group if n != name) for group in _GROUPS for name in group}
    for name, by in _ALSO.items():
        out[name] = (*out.get(name, ()), *by)
    return MappingProxyType(out)


FAMILIES: Final = _families()
"""Command -> the commands whose deny also denies it (docs/access.md has the table)."""


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p.strip().upper()) for p in patterns if p.strip()]
    return re.compile("|".join(parts)) if parts else None


@dataclass
class CommandPolicy:
    """Which command names a session may send; build once per session, ask per command."""

    allow: re.Pattern[str] | None
    """None: nothing allowed."""
    allow_all: bool
    deny: re.Pattern[str] | None
    deny_roles: tuple[tuple[str, re.Pattern[str]], ...] = ()
    named: frozenset[str] = frozenset()
    """Command names the granting roles allow exactly (no glob): how a limited session
    may still run a :data:`SCRIPTING` command."""
    _cache: dict[str, Decision] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, roles: Sequence[Role], *, granting: Iterable[str] | None = None
    ) -> CommandPolicy:
        """Allows come from the roles named in ``granting`` (the ones that let the session
        in; all when None); denies from every role."""
        allowed_by = set(granting) if granting is not None else {r.name for r in roles}
        allow_roles = [r for r in roles if r.name in allowed_by]
        allow_all = any(r.allow.redis_commands is None for r in allow_roles)
        allow = _compile(p for r in allow_roles for p in (r.allow.redis_commands or ()))
        deny_roles = tuple(
            (r.name, pattern)
            for r in roles
            if (pattern := _compile(r.deny.redis_commands or ())) is not None
        )
        deny = _compile(p for r in roles for p in (r.deny.redis_commands or ()))
        named = frozenset(
            p.strip().upper()
            for r in allow_roles
            for p in (r.allow.redis_commands or ())
            if not any(c in p for c in "*?[")
        )
        return cls(allow=allow, allow_all=allow_all, deny=deny, deny_roles=deny_roles, named=named)

    @property
    def limited(self) -> bool:
        """Whether the roles limit commands at all (an allow list or any deny)."""
        return not self.allow_all or self.deny is not None

    def check(self, command_name: str) -> Decision:
        name = command_name.upper()
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        decision = self._decide(name)
        if len(self._cache) < 1024:  # a client sending random names cannot grow it
            self._cache[name] = decision
        return decision

    def _decide(self, name: str) -> Decision:
        if "\0" in name:
            return Decision(
                False,
                "a command name with a NUL byte is refused: the server reads it only up "
                "to the NUL, so no rule could name it",
            )
        if self.deny is not None:
            for denied in (name, *FAMILIES.get(name, ())):
                if self.deny.fullmatch(denied):
                    role = next((r for r, p in self.deny_roles if p.fullmatch(denied)), "?")
                    if denied == name:
                        return Decision(False, f"role {role} denies the command {name}")
                    return Decision(
                        False,
                        f"role {role} denies the command {denied}, and so {name}, which "
                        "does the same",
                    )
        if name in SCRIPTING and self.limited and name not in self.named:
            return Decision(
                False,
                f"{name} runs server-side code whose commands the roles cannot check, and "
                f"your roles limit commands: a role must allow {name} by name",
            )
        if self.allow_all or (self.allow is not None and self.allow.fullmatch(name)):
            return Decision(True, "allowed")
        return Decision(False, f"none of your roles allows the command {name}")


def check_command(roles: Sequence[Role], command_name: str) -> Decision:
    """May holders of ``roles`` run ``command_name``? For one-off checks; on the command
    path build a :class:`CommandPolicy` once per session instead."""
    if not roles:
        return Decision(False, "you have no roles, so no commands")
    return CommandPolicy.build(roles).check(command_name)
