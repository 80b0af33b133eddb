"""Loading YAML config files into pydantic models, with errors a person can act on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.specs import Replication

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config file or flag is wrong; the message names the field and the fix."""


def format_location(loc: tuple[int | str, ...]) -> str:
    """``("aws", 0, "regions")`` -> ``aws[0].regions``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def explain(error: ValidationError, source: str) -> ConfigError:
    """Turn pydantic's errors into one message naming each field and what was expected."""
    lines = []
    for item in error.errors(include_url=False):
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the sample config in deploy/)"
        elif item["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {format_location(tuple(item['loc']))}: {msg}")
    return ConfigError(f"{source}: invalid config\n" + "\n".join(lines))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raise ConfigError for a missing file or bad YAML."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    return data


def load_model(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` as ``model``; raise ConfigError naming every wrong field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise explain(exc, source) from None


ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")


def check_role_arn(arn: str | None) -> str | None:
    """An IAM role ARN, or ValueError saying what one looks like."""
    if arn is not None and not ROLE_ARN.match(arn):
        raise ValueError(f"{arn!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/name)")
    return arn


EXTERNAL_ID = re.compile(r"^[\w+=,.@:/-]{2,1224}$")
"""What STS accepts as ExternalId (AssumeRole's own constraints)."""


def check_external_id(assume_role_arn: str | None, external_id: str | None) -> None:
    """An external id only means something with a role to assume, and must be one STS
    accepts (2 to 1224 of letters, digits and ``+=,.@:/-_``)."""
    if external_id and not assume_role_arn:
        raise ValueError("external_id is only used with assume_role_arn; set both")
    if external_id is not None and not EXTERNAL_ID.match(external_id):
        raise ValueError(
            f"external_id {external_id!r} is not one AWS accepts: 2 to 1224 characters "
            "of letters, digits and +=,.@:/-_"
        )


class Strict(BaseModel):
    """A config section: unknown fields are an error (a typo is named), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class JetStreamPlacement(Strict):
    """Where JetStream keeps the copies: a cluster's name (in a super-cluster) and/or
    server tags (``server_tags`` in nats-server's config); each optional."""

    cluster: str | None = Field(default=None, min_length=1)
    tags: tuple[str, ...] = ()


class JetStreamSettings(Strict):
    """The ``jetstream:`` block of every process config: how many copies of each bucket
    and of the audit stream JetStream keeps, and where. Applied when a process creates
    them; an existing one that differs is refused with how to migrate it. Without the
    block, a process creates R1 and uses what exists."""

    replicas: Literal[1, 3, 5] = 1
    placement: JetStreamPlacement | None = None

    def replication(self) -> Replication:
        placement = self.placement or JetStreamPlacement()
        return Replication(self.replicas, placement.cluster, placement.tags)
