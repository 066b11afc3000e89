"""Access decisions as tables of named cases, plus the deny-by-default property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.access import (
    Action,
    Limits,
    RateLimiter,
    Subject,
    check_max_tokens,
    decide,
)
from agent.policy import default_policy, parse_policy

POLICY = parse_policy(
    {
        "version": 4,
        "roles": {
            "admin": {"permissions": [{"actions": ["admin"]}]},
            "app": {
                "permissions": [
                    {"actions": ["infer", "embed"], "models": ["gemma-*", "minilm"]},
                    {"actions": ["models.list", "status"]},
                ],
                "limits": {"max_tokens": 128, "requests_per_minute": 30},
            },
            "bulk": {
                "permissions": [{"actions": ["infer"], "models": ["gemma-3-270m*"]}],
                "limits": {"max_tokens": 1024},
            },
            "auditor": {"permissions": [{"actions": ["audit.read", "status"]}]},
            "empty": {},
        },
        "bindings": [
            {"role": "admin", "users": ["root"], "uids": [0]},
            {"role": "app", "groups": ["apps"]},
            {"role": "bulk", "users": ["batch"]},
            {"role": "auditor", "uids": [4242]},
            {"role": "empty", "users": ["nobody"]},
            {"role": "app", "key_ids": ["hubkey1"]},
        ],
    }
)

ROOT = Subject(uid=0, gid=0, user="root", groups=("root",))
APP = Subject(uid=1001, gid=1001, user="svc", groups=("svc", "apps"))
BATCH_IN_APPS = Subject(uid=1002, user="batch", groups=("batch", "apps"))
AUDITOR = Subject(uid=4242, user="auditor", groups=("auditor",))
NOBODY = Subject(uid=65534, user="nobody", groups=("nogroup",))
STRANGER = Subject(uid=2000, user="mallory", groups=("mallory", "users"))
ANONYMOUS = Subject()
HUB = Subject(key_id="hubkey1")


@pytest.mark.parametrize(
    ("subject", "action", "resource", "allowed", "reason_part"),
    [
        pytest.param(
            ROOT, Action.INFER, "anything", True, "granted by role admin", id="admin-infers-any-model"
        ),
        pytest.param(ROOT, Action.AUDIT_READ, None, True, "admin", id="admin-reads-audit"),
        pytest.param(ROOT, Action.MODELS_ADMIN, "x", True, "admin", id="admin-administers-models"),
        pytest.param(APP, Action.INFER, "gemma-3-270m", True, "role app", id="group-grants-infer-on-pattern"),
        pytest.param(APP, Action.EMBED, "minilm", True, "role app", id="group-grants-embed-exact-id"),
        pytest.param(
            APP, Action.INFER, "llama-3", False, "infer on model 'llama-3'", id="pattern-excludes-model"
        ),
        pytest.param(APP, Action.INFER, "GEMMA-3", False, "infer on model", id="patterns-are-case-sensitive"),
        pytest.param(APP, Action.INFER, None, True, "role app", id="coarse-check-before-model-known"),
        pytest.param(APP, Action.MODELS_LIST, None, True, "role app", id="list-models"),
        pytest.param(
            APP, Action.MODELS_ADMIN, "gemma-3", False, "models.admin", id="app-cannot-admin-models"
        ),
        pytest.param(APP, Action.AUDIT_READ, None, False, "'audit.read'", id="app-cannot-read-audit"),
        pytest.param(APP, Action.ADMIN, None, False, "'admin'", id="app-is-not-admin"),
        pytest.param(AUDITOR, Action.AUDIT_READ, None, True, "role auditor", id="uid-binding"),
        pytest.param(AUDITOR, Action.INFER, "gemma-3", False, "role(s) auditor", id="uid-binding-no-infer"),
        pytest.param(NOBODY, Action.STATUS, None, False, "role(s) empty", id="role-without-permissions"),
        pytest.param(STRANGER, Action.STATUS, None, False, "no role is bound", id="unbound-user-denied"),
        pytest.param(
            ANONYMOUS, Action.STATUS, None, False, "no role is bound", id="no-peer-credentials-denied"
        ),
        pytest.param(HUB, Action.INFER, "gemma-x", True, "role app", id="hub-key-binding"),
        pytest.param(
            BATCH_IN_APPS, Action.INFER, "gemma-3-270m-q4", True, "app, bulk", id="two-roles-both-grant"
        ),
    ],
)
def test_decision_table(
    subject: Subject, action: Action, resource: str | None, allowed: bool, reason_part: str
) -> None:
    decision = decide(subject, action, resource, POLICY)
    assert decision.allowed is allowed
    assert reason_part in decision.reason
    if not allowed:
        assert decision.missing is not None
        assert decision.missing in decision.reason


@pytest.mark.parametrize(
    ("subject", "resource", "limits"),
    [
        pytest.param(APP, "gemma-3", Limits(128, 30), id="role-limits"),
        pytest.param(BATCH_IN_APPS, "gemma-3-270m", Limits(1024, None), id="most-generous-of-granting-roles"),
        pytest.param(BATCH_IN_APPS, "minilm", Limits(128, 30), id="only-granting-roles-count"),
        pytest.param(ROOT, "gemma-3", Limits(None, None), id="admin-unlimited"),
    ],
)
def test_limits_of_granting_roles(subject: Subject, resource: str, limits: Limits) -> None:
    assert decide(subject, Action.INFER, resource, POLICY).limits == limits


@pytest.mark.parametrize(
    ("requested", "refused"),
    [
        pytest.param(1, False, id="small"),
        pytest.param(128, False, id="at-limit"),
        pytest.param(129, True, id="over-limit"),
    ],
)
def test_max_tokens_limit(requested: int, refused: bool) -> None:
    decision = decide(APP, Action.INFER, "gemma-3", POLICY)
    message = check_max_tokens(decision, requested)
    assert (message is not None) is refused
    if message is not None:
        assert "limit 128" in message and str(requested) in message


def test_default_policy_roles() -> None:
    policy = default_policy(daemon_uid=998, daemon_user="edge-agent", socket_group="edge-clients")
    daemon = Subject(uid=998, user="edge-agent", groups=("edge-agent",))
    client = Subject(uid=1500, user="app", groups=("app", "edge-clients"))
    for action in Action:
        assert decide(ROOT, action, "m", policy).allowed
        assert decide(daemon, action, "m", policy).allowed
    allowed = {a for a in Action if decide(client, a, "m", policy).allowed}
    assert allowed == {Action.INFER, Action.EMBED, Action.MODELS_LIST, Action.STATUS}
    assert not decide(STRANGER, Action.STATUS, None, policy).allowed


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
bound_names = {"root", "svc", "batch", "nobody", "auditor", "apps"}


@given(
    uid=st.integers(min_value=1, max_value=2**31 - 1).filter(lambda u: u != 4242),
    user=names.filter(lambda n: n not in bound_names),
    groups=st.lists(names.filter(lambda n: n not in bound_names), max_size=5),
    action=st.sampled_from(list(Action)),
    resource=st.one_of(st.none(), names),
)
def test_subject_without_binding_is_always_denied(
    uid: int, user: str, groups: list[str], action: Action, resource: str | None
) -> None:
    subject = Subject(uid=uid, gid=uid, user=user, groups=tuple(groups))
    decision = decide(subject, action, resource, POLICY)
    assert not decision.allowed
    assert "no role is bound" in decision.reason


@given(action=st.sampled_from(list(Action)), resource=st.one_of(st.none(), names))
def test_policy_without_bindings_denies_everyone(action: Action, resource: str | None) -> None:
    empty = parse_policy({"roles": {"admin": {"permissions": [{"actions": ["admin"]}]}}})
    assert not decide(ROOT, action, resource, empty).allowed


def test_rate_limiter_refills_and_names_the_wait() -> None:
    now = [1000.0]
    limiter = RateLimiter(lambda: now[0])
    assert all(limiter.hit("u", 3) == 0.0 for _ in range(3))  # the burst
    wait = limiter.hit("u", 3)
    assert 19.9 <= wait <= 20.0  # one request per 20 s
    assert limiter.hit("other", 3) == 0.0  # per key
    now[0] += 20.0
    assert limiter.hit("u", 3) == 0.0
    assert limiter.hit("u", 3) > 0.0


def test_rate_limiter_forgets_idle_buckets() -> None:
    now = [0.0]
    limiter = RateLimiter(lambda: now[0], max_keys=10)
    for i in range(10):
        limiter.hit(f"k{i}", 60)
    now[0] += 61.0
    limiter.hit("fresh", 60)
    assert set(limiter._buckets) == {"fresh"}


lower = st.text(alphabet="abcdefghij", min_size=1, max_size=6)
upper = st.text(alphabet="KLMNOPQRST", min_size=1, max_size=6)
policies = st.fixed_dictionaries(
    {
        "roles": st.dictionaries(
            lower,
            st.fixed_dictionaries(
                {
                    "permissions": st.lists(
                        st.fixed_dictionaries(
                            {
                                "actions": st.lists(st.sampled_from([a.value for a in Action]), min_size=1),
                                "models": st.lists(st.sampled_from(["*", "gemma-*", "x"]), min_size=1),
                            }
                        ),
                        max_size=3,
                    )
                }
            ),
            min_size=1,
            max_size=4,
        ),
    }
).flatmap(
    lambda doc: st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(sorted(doc["roles"])),
                "users": st.lists(lower, max_size=3),
                "groups": st.lists(lower, max_size=3),
                "uids": st.lists(st.integers(0, 999), min_size=1, max_size=3),
            }
        ),
        max_size=5,
    ).map(lambda bindings: {**doc, "bindings": bindings})
)


@given(
    document=policies,
    uid=st.integers(1000, 2**31 - 1),
    user=upper,
    groups=st.lists(upper, max_size=4),
    action=st.sampled_from(list(Action)),
    resource=st.one_of(st.none(), st.sampled_from(["gemma-3", "x", "y"])),
)
def test_unbound_subject_is_denied_under_any_policy(
    document: dict[str, object], uid: int, user: str, groups: list[str], action: Action, resource: str | None
) -> None:
    """Bindings name lower-case users/groups and uids < 1000; the subject has none of those."""
    policy = parse_policy(document)
    decision = decide(Subject(uid=uid, gid=uid, user=user, groups=tuple(groups)), action, resource, policy)
    assert not decision.allowed and decision.roles == ()
