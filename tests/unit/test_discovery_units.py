"""Pure parts of discovery: naming, labels, matching, reconcile, config errors."""

from __future__ import annotations

from typing import Any

import pytest

from bus import labels
from bus.schemas import (
    AWSSpec,
    DatabaseResource,
    DatabaseSpec,
    DiscoveryOrigin,
    MemoryDBSpec,
    Metadata,
)
from discovery.aws.errors import FetchForbidden, FetchThrottled, NoCredentials, map_error
from discovery.convert import Context, Warnings, convert, discovered_name, usable
from discovery.matchers import FetcherKey, status_key_of
from discovery.reconcile import reconcile
from discovery.results import FetchResult
from discovery.settings import AwsMatcher, DiscoveryConfig, DiscoveryService
from fleetgate.config import ConfigError, load_model
from fleetgate.durations import parse_duration

ARN = "arn:aws:memorydb:us-east-1:123456789012:cluster/orders"


def cluster(**over: Any) -> dict[str, Any]:
    base = {
        "Name": "orders",
        "ARN": ARN,
        "Status": "available",
        "TLSEnabled": True,
        "ACLName": "acl-a",
        "EngineVersion": "7.1",
        "SubnetGroupName": "sg",
        "ClusterEndpoint": {
            "Address": "clustercfg.orders.x.memorydb.us-east-1.amazonaws.com",
            "Port": 6379,
        },
    }
    base.update(over)
    return base


CTX = Context(group="", fetcher_id="f1")


# -- naming ---------------------------------------------------------------------------


def test_name_gets_type_region_and_account_suffix() -> None:
    assert discovered_name("orders", "us-east-1", "123456789012") == (
        "orders-memorydb-us-east-1-123456789012"
    )


def test_name_suffix_skips_parts_already_present_and_sanitises() -> None:
    assert discovered_name("Orders  US-East-1", "us-east-1", "1234") == (
        "orders-us-east-1-memorydb-1234"
    )
    assert discovered_name("cache--memorydb", "eu-west-1", "123456789012") == (
        "cache-memorydb-eu-west-1-123456789012"
    )
    # whole words only: "east" inside "feast" is not the region
    assert discovered_name("feast-1", "us-east-1", "1") == "feast-1-memorydb-us-east-1"


def test_name_tag_overrides_and_invalid_tag_falls_back_with_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    res = convert(
        cluster(),
        tags={"FleetgateDatabaseName": "orders-prod"},
        vpc_id=None,
        iam_users=None,
        ctx=CTX,
        warnings=Warnings(),
    )
    assert res.name == "orders-prod"
    res = convert(
        cluster(ARN=ARN + "x"),
        tags={"FleetgateDatabaseName": "Bad Name!"},
        vpc_id=None,
        iam_users=None,
        ctx=CTX,
        warnings=Warnings(),
    )
    assert res.name == "orders-memorydb-us-east-1-123456789012"
    assert "not a valid database name" in caplog.text


# -- labels ---------------------------------------------------------------------------


def test_labels_computed_and_tags() -> None:
    res = convert(
        cluster(),
        tags={"env": "prod", "aws:cloudformation:stack-id": "s", "bad key": "x"},
        vpc_id="vpc-1",
        iam_users=("iam-a",),
        ctx=Context("grp", "f1"),
        warnings=Warnings(),
    )
    assert res.metadata.labels == {
        "env": "prod",
        "aws:cloudformation:stack-id": "s",
        "account-id": "123456789012",
        "region": "us-east-1",
        "engine": "redis",
        "engine-version": "7.1",
        "endpoint-type": "cluster",
        "vpc-id": "vpc-1",
        "fleetgate.dev/cloud": "AWS",
        "fleetgate.dev/origin": "cloud",
        "fleetgate.dev/discovery-type": "memorydb",
        "fleetgate.dev/discovered-name": "orders",
        "fleetgate.dev/discovery-group": "grp",
    }
    assert res.spec.uri == "clustercfg.orders.x.memorydb.us-east-1.amazonaws.com:6379"
    assert res.spec.aws is not None and res.spec.aws.memorydb is not None
    assert res.spec.aws.memorydb.iam_users == ("iam-a",)
    assert res.metadata.description == "MemoryDB cluster in us-east-1"


def test_computed_label_beats_tag_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    warnings = Warnings()
    for _ in range(3):
        res = convert(
            cluster(Engine="valkey"),
            tags={"region": "mars", "engine": "x"},
            vpc_id=None,
            iam_users=None,
            ctx=CTX,
            warnings=warnings,
        )
    assert res.metadata.labels["region"] == "us-east-1"
    assert res.metadata.labels["engine"] == "valkey"
    assert caplog.text.count("'region'") == 1
    # once per owner of the set of warnings given, not once per process
    fresh = Warnings()
    convert(
        cluster(), tags={"region": "mars"}, vpc_id=None, iam_users=None, ctx=CTX, warnings=fresh
    )
    assert caplog.text.count("'region'") == 2


def test_an_unknown_status_is_warned_about_once_per_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warnings = Warnings()
    for _ in range(2):
        assert usable(cluster(Status="brand-new-status"), warnings=warnings)[0]
    assert caplog.text.count("brand-new-status") == 1


@pytest.mark.parametrize(
    ("over", "ok"),
    [
        ({}, True),
        ({"TLSEnabled": False}, False),
        ({"Status": "creating"}, False),
        ({"Status": "deleting"}, False),
        ({"Status": "create-failed"}, False),
        ({"Status": "modifying"}, True),
        ({"Status": "snapshotting"}, True),
        ({"Status": "Available"}, True),
        ({"Status": "brand-new-status"}, True),
    ],
)
def test_usable_clusters(over: dict[str, Any], ok: bool) -> None:
    assert usable(cluster(**over), warnings=Warnings())[0] is ok


# -- matching -------------------------------------------------------------------------

LABELS = {"env": "prod-7", "team": "payments", "region": "us-east-1"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, False),
        ({"*": "*"}, True),
        ({"env": "prod-7"}, True),
        ({"env": ["dev", "prod-7"]}, True),
        ({"env": "prod-*"}, True),
        ({"env": "^prod-[0-9]+$"}, True),
        ({"env": "^prod-[a-z]+$"}, False),
        ({"env": "prod"}, False),
        ({"env": "*", "missing": "*"}, False),
        ({"env": "*", "team": "pay*"}, True),
        ({"team": ["a", "b"]}, False),
    ],
)
def test_selector_semantics(selector: dict[str, Any], expected: bool) -> None:
    assert labels.matches(selector, LABELS) is expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"env": "^bad[$"}, "not a valid regex"),
        ({"*": "prod"}, "only takes"),
        ({"env": []}, "at least one"),
    ],
)
def test_bad_selectors_are_explained(selector: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        labels.check_selector(selector)


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "needle"),
    [
        (
            {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}], "poll_interval": "5x"},
            "discovery_service.poll_interval: '5x' is not a duration",
        ),
        (
            {"aws": [{"types": ["rds"], "regions": ["us-east-1"]}]},
            "discovery_service.aws[0].types[0]",
        ),
        (
            {"aws": [{"types": ["memorydb"], "regions": ["moon-1"]}]},
            "discovery_service.aws[0].regions: 'moon-1' is not an AWS region",
        ),
        (
            {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"], "tags": {}}]},
            "an empty selector matches nothing",
        ),
        (
            {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"], "tagz": {}}]},
            "discovery_service.aws[0].tagz: unknown field",
        ),
        (
            {
                "aws": [
                    {"types": ["memorydb"], "regions": ["us-east-1"], "assume_role_arn": "role/x"}
                ]
            },
            "is not an IAM role ARN",
        ),
        (
            {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"], "external_id": "x"}]},
            "external_id is only used with assume_role_arn",
        ),
        (
            {
                "aws": [
                    {
                        "types": ["memorydb"],
                        "regions": ["us-east-1"],
                        "assume_role_arn": "arn:aws:iam::123456789012:role/r",
                        "external_id": "x",
                    }
                ]
            },
            "external_id 'x' is not one AWS accepts: 2 to 1224 characters",
        ),
        ({"aws": []}, "discovery_service.aws"),
        (
            {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}], "lease": {"period": 0.5}},
            "discovery_service.lease.period: lease period must be between 1s and 1h",
        ),
        (
            {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}], "lease": {"ttl": "5s"}},
            "discovery_service.lease.ttl: unknown field",
        ),
    ],
)
def test_config_errors_name_the_field(service: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_model(DiscoveryConfig, {"discovery_service": service}, "disc.yaml")
    assert needle in str(err.value)
    assert str(err.value).startswith("disc.yaml: invalid config")


def test_durations() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration(45) == 45
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("five minutes")


# -- AWS error mapping ----------------------------------------------------------------


def test_error_mapping() -> None:
    import botocore.exceptions as be

    def client_error(code: str) -> Exception:
        return be.ClientError({"Error": {"Code": code, "Message": "m"}}, "DescribeClusters")

    assert isinstance(map_error(client_error("AccessDeniedException"), "x"), FetchForbidden)
    assert isinstance(map_error(client_error("ThrottlingException"), "x"), FetchThrottled)
    assert isinstance(map_error(be.NoCredentialsError(), "x"), NoCredentials)
    assert "AWS_PROFILE" in str(map_error(be.NoCredentialsError(), "x"))


# -- reconcile ------------------------------------------------------------------------

MATCHER = AwsMatcher(types=["memorydb"], regions=["us-east-1"])
KEY = FetcherKey(0, MATCHER, "memorydb", "us-east-1")


def res(
    name: str, *, fid: str = "f1", group: str = "", arn: str | None = None, env: str = "prod"
) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name, labels={"env": env}),
        spec=DatabaseSpec(
            uri=f"{name}:6379",
            aws=AWSSpec(
                region="us-east-1",
                account_id="1",
                memorydb=MemoryDBSpec(cluster_name=name, arn=arn or f"arn:{name}"),
            ),
        ),
        origin=DiscoveryOrigin(group=group, fetcher_id=fid),
    )


def result(
    fid: str | None,
    state: str = "ok",
    resources: list[DatabaseResource] | None = None,
    carried: set[str] | None = None,
) -> FetchResult:
    return FetchResult(
        KEY,
        "1",
        fid,
        state=state,  # type: ignore[arg-type]
        resources=resources or [],
        carried=carried or set(),
    )


def test_reconcile_creates_updates_deletes_only_what_changed() -> None:
    current = {"a": res("a"), "b": res("b"), "gone": res("gone")}
    plan = reconcile(
        current, [result("f1", resources=[res("a"), res("b", env="dev"), res("c")])], group=""
    )
    assert [r.name for r in plan.puts] == ["b", "c"]
    assert plan.deletes == ["gone"]


def test_reconcile_failed_fetcher_changes_nothing() -> None:
    current = {"a": res("a"), "b": res("b", fid="f2")}
    plan = reconcile(current, [result("f1", state="failed"), result("f2", resources=[])], group="")
    assert plan.puts == [] and plan.deletes == ["b"]


def test_reconcile_unknown_fetcher_identity_deletes_no_orphans() -> None:
    current = {"old": res("old", fid="from-an-edited-matcher")}
    assert reconcile(current, [result(None, state="failed")], group="").deletes == []
    assert reconcile(current, [result("f1")], group="").deletes == ["old"]


def test_reconcile_carried_clusters_keep_their_last_resource() -> None:
    current = {"a": res("a", arn="arn:a")}
    fresh = res("a", arn="arn:a", env="dev")
    plan = reconcile(
        current, [result("f1", state="partial", resources=[fresh], carried={"arn:a"})], group=""
    )
    assert plan.puts == [] and plan.deletes == []
    # a carried cluster with no previous resource is enrolled with what is known
    plan = reconcile(
        {}, [result("f1", state="partial", resources=[fresh], carried={"arn:a"})], group=""
    )
    assert [r.name for r in plan.puts] == ["a"]


def test_reconcile_never_touches_other_groups_or_static_names() -> None:
    theirs = res("a", group="other")
    static = DatabaseResource(metadata=Metadata(name="s"), spec=DatabaseSpec(uri="h:1"))
    current = {"a": theirs, "s": static}
    plan = reconcile(current, [result("f1", resources=[res("a"), res("s")])], group="")
    assert plan.puts == [] and plan.deletes == []
    assert len(plan.conflicts) == 2


def test_reconcile_same_name_from_two_clusters_keeps_first() -> None:
    plan = reconcile(
        {},
        [
            result("f1", resources=[res("x", arn="arn:1")]),
            result("f2", resources=[res("x", fid="f2", arn="arn:2")]),
        ],
        group="",
    )
    assert [r.spec.aws.memorydb.arn for r in plan.puts] == ["arn:1"]  # type: ignore[union-attr]
    assert "want this name" in plan.conflicts[0]


# -- reconcile with a scope (discovery replicas) ---------------------------------------

SCOPED = KEY.status_key  # memorydb.us-east-1.<digest>
DIGEST = SCOPED.rsplit(".", 1)[1]
MINE = f"memorydb.us-east-1.1.{DIGEST}"  # the fetcher id of KEY in account 1


def test_status_key_of_a_fetcher_id() -> None:
    assert status_key_of(MINE) == SCOPED
    assert status_key_of(KEY.fetcher_id("222")) == SCOPED
    assert status_key_of("legacy-id") == "legacy-id"
    assert status_key_of("a..b.c") == "a..b.c"


def test_lease_period_default_and_forms() -> None:
    aws = [{"types": ["memorydb"], "regions": ["us-east-1"]}]
    assert DiscoveryService.model_validate({"aws": aws}).lease.period == 30
    cfg = DiscoveryService.model_validate({"aws": aws, "lease": {"period": "2m"}})
    assert cfg.lease.period == 120


def test_scoped_reconcile_touches_only_fetchers_in_scope() -> None:
    other = "memorydb.eu-west-1.1.ffffffffff"  # another replica's fetcher
    current = {"a": res("a", fid=MINE), "b": res("b", fid=other), "gone": res("gone", fid=MINE)}
    plan = reconcile(
        current,
        [result(MINE, resources=[res("a", fid=MINE, env="dev"), res("b", fid=MINE)])],
        group="",
        scope={SCOPED},
    )
    assert [r.name for r in plan.puts] == ["a"]
    assert plan.deletes == ["gone"]  # b is another fetcher's, polled by another replica
    assert "another fetcher of this discovery group" in plan.conflicts[0]


def test_scoped_reconcile_failed_fetcher_with_unknown_account_freezes_its_key() -> None:
    current = {"a": res("a", fid=MINE), "old": res("old", fid=f"memorydb.us-east-1.9.{DIGEST}")}
    plan = reconcile(current, [result(None, state="failed")], group="", scope={SCOPED})
    assert plan.puts == [] and plan.deletes == []


def test_scoped_reconcile_deletes_an_adopted_orphans_resources_only() -> None:
    orphan = "memorydb.us-east-1.1.0000000000"  # a matcher no longer in the config
    elsewhere = "memorydb.us-east-1.1.1111111111"  # another replica's config still has it
    current = {"o": res("o", fid=orphan), "e": res("e", fid=elsewhere)}
    plan = reconcile(current, [result(MINE)], group="", scope={SCOPED, status_key_of(orphan)})
    assert plan.deletes == ["o"]
    # without a scope every unknown fetcher's resources go (one discovery alone)
    assert sorted(reconcile(current, [result(MINE)], group="").deletes) == ["e", "o"]
