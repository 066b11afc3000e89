"""The reload rules (what changed, what applies live, what the store sync does) as tables, and the
reload shell against real config files, a real pool (fake engines: the engine seam) and real
sd_notify datagrams."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import Settings
from agent.daemon.reload import (
    LIVE_KEYS,
    ConfigSource,
    Reloader,
    ReloadReport,
    diff_settings,
    effective_settings,
    plan_pins,
    plan_register,
    plan_reload,
    plan_store,
    store_mode,
)
from agent.daemon.sdnotify import ServiceNotifier, SocketNotifier
from agent.engine.base import ModelInfo
from agent.engine.pool import ModelPool
from agent.errors import ConfigError
from agent.policy import PolicyHolder, accept_policy, default_policy, parse_policy
from tests.fakes.engine import FakeBehaviour, FakeEngine, fake_info
from tests.service.conftest import NotifyListener


def settings(**sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(sections)


# -- diff and split ---------------------------------------------------------------------------------

DIFF_CASES = [
    pytest.param({}, {}, (), (), id="nothing-changed"),
    pytest.param({}, {"log": {"level": "debug"}}, ("log.level",), (), id="log-level-live"),
    pytest.param({}, {"pool": {"pinned": ["m"]}}, ("pool.pinned",), (), id="pins-live"),
    pytest.param(
        {"pool": {"keep_alive_s": 300}},
        {"pool": {"keep_alive_s": 10, "max_loaded": 2, "memory_budget_mb": 512}},
        ("pool.keep_alive_s", "pool.max_loaded", "pool.memory_budget_mb"),
        (),
        id="pool-limits-live",
    ),
    pytest.param(
        {},
        {
            "access": {
                "roles": {"r": {"permissions": [{"actions": ["status"]}]}},
                "bindings": [{"role": "r", "uids": [7]}],
            }
        },
        ("access.bindings", "access.roles"),
        (),
        id="access-live",
    ),
    pytest.param({}, {"audit": {"audit_reads": True}}, ("audit.audit_reads",), (), id="audit-reads-live"),
    pytest.param({}, {"engine": {"n_ctx": 1024}}, (), ("engine.n_ctx",), id="engine-restart"),
    pytest.param(
        {}, {"server": {"socket_path": "/tmp/x.sock"}}, (), ("server.socket_path",), id="socket-restart"
    ),
    pytest.param({}, {"hub": {"port": 1883}}, (), ("hub.port",), id="hub-restart"),
    pytest.param({}, {"state_dir": "/var/other"}, (), ("state_dir",), id="state-dir-restart"),
    pytest.param(
        {},
        {"service": {"intervals_s": {"rehash": 60}}},
        (),
        ("service.intervals_s",),
        id="dict-field-restart",
    ),
    pytest.param(
        {},
        {"log": {"format": "json"}, "engine": {"n_parallel": 2}},
        ("log.format",),
        ("engine.n_parallel",),
        id="mixed",
    ),
]


@pytest.mark.parametrize(("old", "new", "live", "restart"), DIFF_CASES)
def test_plan_splits_changes_into_live_and_restart_needed(
    old: dict[str, Any], new: dict[str, Any], live: tuple[str, ...], restart: tuple[str, ...]
) -> None:
    plan = plan_reload(settings(**old), settings(**new))
    assert plan.live == live
    assert plan.restart_needed == restart
    assert plan.changed == tuple(sorted(live + restart))
    assert diff_settings(settings(**old), settings(**new)) == plan.changed


def test_every_live_key_is_a_setting() -> None:
    s = Settings()
    for key in LIVE_KEYS:
        section, _, name = key.partition(".")
        assert name in type(getattr(s, section)).model_fields, key


def test_effective_settings_take_only_the_live_keys() -> None:
    old = settings(log={"level": "info"}, engine={"n_ctx": 4096})
    new = settings(log={"level": "debug"}, engine={"n_ctx": 1024})
    plan = plan_reload(old, new)
    running = effective_settings(old, new, plan.live)
    assert running.log.level == "debug"
    assert running.engine.n_ctx == 4096  # never half-applied
    assert plan_reload(running, new).changed == ("engine.n_ctx",)  # reported again next time


# -- store and pins ---------------------------------------------------------------------------------

STORE = Path("/state/registry/blobs")


def info(model_id: str, blob: str, where: Path = STORE) -> ModelInfo:
    return ModelInfo(id=model_id, path=where / blob, format="gguf", task="completion", size_bytes=1)


STORE_CASES = [
    pytest.param({"a": STORE / "1"}, [info("a", "1")], "a", [], [], [], id="unchanged"),
    pytest.param({"a": STORE / "1"}, [info("a", "1"), info("b", "2")], "a", ["b"], [], [], id="imported"),
    pytest.param({}, [info("a", "1")], None, ["a"], [], [], id="first-model-into-empty-pool"),
    pytest.param({"a": STORE / "1", "b": STORE / "2"}, [info("a", "1")], "a", [], ["b"], [], id="removed"),
    pytest.param({"a": STORE / "1"}, [], "a", [], [], ["a"], id="default-gone-kept"),
    pytest.param(
        {"a": STORE / "1", "b": STORE / "2"},
        [info("a", "1"), info("b", "3")],
        "a",
        ["b"],
        ["b"],
        [],
        id="new-version",
    ),
    pytest.param({"a": STORE / "1"}, [info("a", "9")], "a", [], [], ["a"], id="new-version-of-default-kept"),
    pytest.param(
        {"dev": Path("/home/me/dev.gguf"), "a": STORE / "1"},
        [info("a", "1")],
        "dev",
        [],
        [],
        [],
        id="config-model-untouched",
    ),
]


@pytest.mark.parametrize(("served", "store", "default", "added", "removed", "kept"), STORE_CASES)
def test_store_plan(
    served: dict[str, Path],
    store: list[ModelInfo],
    default: str | None,
    added: list[str],
    removed: list[str],
    kept: list[str],
) -> None:
    plan = plan_store(served, store, STORE, default)
    assert [i.id for i in plan.add] == added
    assert list(plan.remove) == removed
    assert list(plan.kept) == kept


REGISTER_CASES = [
    pytest.param(["b"], [info("b", "3")], ["b"], ["b"], [], id="old-version-removed"),
    pytest.param(["b"], [info("b", "3")], [], [], ["b"], id="old-version-not-removed-kept"),
    pytest.param([], [info("c", "4")], [], ["c"], [], id="new-model-needs-no-removal"),
    pytest.param(
        ["b", "c"], [info("b", "3"), info("c", "5")], ["c"], ["c"], ["b"], id="only-the-removed-replaced"
    ),
]


@pytest.mark.parametrize(("remove", "add", "removed", "registered", "kept"), REGISTER_CASES)
def test_a_new_version_is_registered_only_after_the_old_entry_was_removed(
    remove: list[str], add: list[ModelInfo], removed: list[str], registered: list[str], kept: list[str]
) -> None:
    from agent.daemon.reload import StorePlan

    register, not_replaced = plan_register(StorePlan(tuple(add), tuple(remove)), removed)
    assert [i.id for i in register] == registered
    assert list(not_replaced) == kept


HUB = {
    "host": "hub.example",
    "ca_file": "/tls/ca.pem",
    "cert_file": "/tls/box.pem",
    "key_file": "/tls/box.key",
}
HUB_TOML = "[hub]\n" + "".join(f'{k} = "{v}"\n' for k, v in HUB.items())

STORE_MODE_CASES = [
    pytest.param({}, "reloaded", id="no-hub-reload-reads-the-store"),
    pytest.param({"hub": HUB}, "managed by sync", id="sync-owns-the-store"),
]


@pytest.mark.parametrize(("running", "expected"), STORE_MODE_CASES)
def test_store_mode(running: dict[str, Any], expected: str) -> None:
    assert store_mode(settings(**running)) == expected


PIN_CASES = [
    pytest.param([], ["a"], ["a", "b"], {"a": True}, id="pin"),
    pytest.param(["a"], [], ["a"], {"a": False}, id="unpin"),
    pytest.param(["a"], ["a", "b"], ["a", "b"], {"b": True}, id="only-the-difference"),
    pytest.param([], ["zzz"], ["a"], {}, id="unknown-model-ignored"),
    pytest.param(["a"], ["a"], ["a"], {}, id="unchanged"),
]


@pytest.mark.parametrize(("old", "new", "served", "expected"), PIN_CASES)
def test_pin_plan(old: list[str], new: list[str], served: list[str], expected: dict[str, bool]) -> None:
    assert plan_pins(old, new, served) == expected


# -- the config source ------------------------------------------------------------------------------

BAD_CONFIGS = [
    pytest.param("[pool]\nkeep_alive = 3\n", "pool.keep_alive = 3: unknown setting", id="unknown-key"),
    pytest.param('[log]\nlevel = "loud"\n', "log.level = 'loud'", id="bad-value"),
    pytest.param("[pool\n", "invalid TOML", id="not-toml"),
    pytest.param(
        '[[access.bindings]]\nrole = "nobody"\nuids = [1]\n[access.roles.r]\npermissions = []\n',
        "access.bindings",
        id="binding-to-missing-role",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_source_refuses_a_bad_config_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        ConfigSource(path).load()
    message = str(err.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_source_keeps_the_state_dir_override(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('state_dir = "/elsewhere"\n[log]\nlevel = "debug"\n')
    loaded = ConfigSource(path, tmp_path / "state").load()
    assert loaded.state_dir == tmp_path / "state" and loaded.log.level == "debug"


# -- the policy holder ------------------------------------------------------------------------------

ROLE = {"r": {"permissions": [{"actions": ["status"]}]}}


def test_replacing_the_local_policy_takes_effect_and_is_announced(tmp_path: Path) -> None:
    start = default_policy(0, "root", "root")
    holder = PolicyHolder(start, tmp_path)
    seen: list[tuple[str, str]] = []
    holder.on_change = lambda old, new: seen.append((old.source, new.source))
    new = parse_policy({"roles": ROLE, "bindings": [{"role": "r", "uids": [5]}]}, "config [access]")
    assert holder.replace_local(new) is True
    assert holder.current() is new and holder.local is new
    assert seen == [("built-in default", "config [access]")]


def test_a_hub_policy_in_force_stays_after_a_local_reload(tmp_path: Path) -> None:
    doc = json.dumps({"version": 3, "roles": ROLE, "bindings": [{"role": "r", "uids": [9]}]}).encode()
    accept_policy(tmp_path, doc, 3)
    holder = PolicyHolder(default_policy(0, "root", "root"), tmp_path)
    assert holder.current().version == 3
    new = parse_policy({"roles": ROLE, "bindings": [{"role": "r", "uids": [5]}]}, "config [access]")
    assert holder.replace_local(new) is False
    assert holder.current().source == "hub v3"
    assert holder.local is new


# -- the reloader shell -----------------------------------------------------------------------------


def _pool(*ids: str) -> ModelPool:
    pool = ModelPool(FakeEngine, memory_budget=1 << 30, smoke_test=None)
    for model_id in ids:
        pool.add(FakeEngine(fake_info(model_id)))
    return pool


def _write(path: Path, text: str) -> None:
    path.write_text(text)


async def _test_reloader_applies_live_keys_and_reports_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    _write(config, f'state_dir = "{tmp_path}"\n')
    source = ConfigSource(config)
    pool = _pool("a", "b")
    reloader = Reloader(source, source.load(), pool, budget_for=lambda p: (p.memory_budget_mb or 0) << 20)
    _write(
        config,
        f'state_dir = "{tmp_path}"\n[pool]\npinned = ["b"]\nkeep_alive_s = 5\nmax_loaded = 2\n'
        "memory_budget_mb = 64\n[engine]\nn_ctx = 1024\n",
    )
    report = await reloader.reload("test")
    assert report.error is None
    assert report.applied == ("pool.keep_alive_s", "pool.max_loaded", "pool.memory_budget_mb", "pool.pinned")
    assert report.restart_needed == ("engine.n_ctx",)
    assert (pool.keep_alive_s, pool.max_loaded, pool.memory_budget) == (5, 2, 64 << 20)
    assert {r.id: r.pinned for r in pool.status()} == {"a": False, "b": True}
    assert reloader.settings.engine.n_ctx == 4096 and reloader.settings.pool.pinned == ["b"]
    await pool.close()


def test_reloader_applies_live_keys_and_reports_the_rest(tmp_path: Path) -> None:
    asyncio.run(_test_reloader_applies_live_keys_and_reports_the_rest(tmp_path))


async def _test_reloader_keeps_running_settings_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    _write(config, "[pool]\nkeep_alive_s = 7\n")
    source = ConfigSource(config)
    pool = _pool("a")
    pool.keep_alive_s = 7
    reloader = Reloader(source, source.load(), pool)
    _write(config, "[pool]\nkeep_alive_s = -1\n")
    report = await reloader.reload("test")
    assert report.outcome == "refused"
    assert report.error is not None and "pool.keep_alive_s = -1" in report.error
    assert pool.keep_alive_s == 7 and reloader.settings.pool.keep_alive_s == 7
    assert report.to_dict()["changed"] == []
    await pool.close()


def test_reloader_keeps_running_settings_on_a_bad_config(tmp_path: Path) -> None:
    asyncio.run(_test_reloader_keeps_running_settings_on_a_bad_config(tmp_path))


async def _test_reloads_are_serialised(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    _write(config, "")
    source = ConfigSource(config)
    pool = _pool("a")
    reloader = Reloader(source, source.load(), pool)
    _write(config, "[pool]\nkeep_alive_s = 9\n")
    first, second = await asyncio.gather(reloader.reload("one"), reloader.reload("two"))
    assert first.applied == ("pool.keep_alive_s",)
    assert second.changed == ()  # it saw the settings the first one left
    assert reloader.reloads == 2
    await pool.close()


def test_reloads_are_serialised(tmp_path: Path) -> None:
    asyncio.run(_test_reloads_are_serialised(tmp_path))


async def _test_reloader_notifies_reloading_then_ready(
    tmp_path: Path, notify_listener: NotifyListener
) -> None:
    config = tmp_path / "config.toml"
    _write(config, "")
    source = ConfigSource(config)
    pool = _pool("a")
    service = ServiceNotifier(SocketNotifier(str(notify_listener.path)))
    reloader = Reloader(source, source.load(), pool, notifier=service)
    _write(config, "[engine]\nn_ctx = 1024\n")
    before = time.monotonic_ns() // 1000
    await reloader.reload("test")
    after = time.monotonic_ns() // 1000
    reloading = notify_listener.wait_for("RELOADING", "1", timeout=5)
    ready = notify_listener.wait_for("READY", "1", timeout=5)
    assert before <= int(reloading.get("MONOTONIC_USEC") or 0) <= after
    assert ready.at >= reloading.at
    assert "restart needed for: engine.n_ctx" in str(ready.get("STATUS"))
    await pool.close()


def test_reloader_notifies_reloading_then_ready(tmp_path: Path, notify_listener: NotifyListener) -> None:
    asyncio.run(_test_reloader_notifies_reloading_then_ready(tmp_path, notify_listener))


def test_policy_file_contents_audit_reads_and_log_level_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import structlog

    from agent.audit.store import AuditLog, audit_path
    from fleet.log import get_logger

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"roles": ROLE, "bindings": [{"role": "r", "uids": [5]}]}))
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[access]\npolicy_file = "{policy}"\n')
    source = ConfigSource(config)
    start = source.load()

    async def run() -> tuple[Any, Any, bool]:
        from agent.server.guard import open_guard

        pool = ModelPool()
        guard = open_guard(start, pool)
        try:
            reloader = Reloader(source, start, pool, guard)
            policy.write_text(json.dumps({"roles": ROLE, "bindings": [{"role": "r", "uids": [6]}]}))
            config.write_text(
                config.read_text()
                + '[audit]\naudit_reads = true\n[log]\nlevel = "warning"\nformat = "json"\n'
            )
            report = await reloader.reload("test")
            get_logger("reload-test").info("hidden_line")
            get_logger("reload-test").warning("shown_line")
            return report, guard.policies.current(), guard.audit_reads
        finally:
            guard.close()
            structlog.reset_defaults()

    report, current, audit_reads = asyncio.run(run())
    out = capsys.readouterr().out
    assert report.changed == ("audit.audit_reads", "log.format", "log.level")
    assert report.policy_changed  # the file's contents changed, not the key
    assert [sorted(b.uids) for b in current.bindings] == [[6]] and current.source == str(policy)
    assert audit_reads is True
    assert "hidden_line" not in out and json.loads(out.strip().splitlines()[-1])["event"] == "shown_line"
    records = [s.record() for s in AuditLog(audit_path(tmp_path)).iter_records()]
    actions = [(r["action"], r["outcome"]) for r in records]
    assert ("policy.change", "ok") in actions and actions[-1] == ("config.reload", "ok")
    assert records[-1]["details"]["changed"] == ["audit.audit_reads", "log.format", "log.level"]


async def _test_a_lowered_budget_unloads_idle_models_at_once(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    _write(config, f'state_dir = "{tmp_path}"\n')
    source = ConfigSource(config)
    pool = _pool("a", "b")  # a is the default; both 100 MiB
    pool.start_loading()
    await pool.wait_loaded()
    reloader = Reloader(source, source.load(), pool, budget_for=lambda p: (p.memory_budget_mb or 0) << 20)
    _write(config, f'state_dir = "{tmp_path}"\n[pool]\nmemory_budget_mb = 150\n')
    report = await reloader.reload("test")
    assert report.applied == ("pool.memory_budget_mb",)
    assert {r.id: r.state for r in pool.status() if r.state != "retiring"} == {"a": "ready", "b": "unloaded"}
    await pool.close()


def test_a_lowered_budget_unloads_idle_models_at_once(tmp_path: Path) -> None:
    asyncio.run(_test_a_lowered_budget_unloads_idle_models_at_once(tmp_path))


# -- the reloader and a real signed store ------------------------------------------------------------


def _store_box(tmp_path: Path, *models: str) -> Any:
    """A real enrolled device store (signed by a real hub repository) holding ``models`` (version 1)."""
    from tests.registry.fleet import Fleet

    fleet = Fleet(tmp_path / "fleet")
    for model_id in models:
        fleet.model(model_id, publish=False)
    fleet.deploy("lab", *models)
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    return fleet, box


SYNC_CASES = [
    pytest.param("", ("b",), "reloaded", id="no-sync-reload-registers-the-store"),
    pytest.param(HUB_TOML, (), "managed by sync", id="sync-configured-store-untouched"),
]


async def _test_store_models_are_left_to_sync(
    tmp_path: Path, hub: str, added: tuple[str, ...], store: str
) -> None:
    _, box = _store_box(tmp_path, "b")
    config = tmp_path / "config.toml"
    _write(config, f'state_dir = "{box.state_dir}"\n{hub}')
    source = ConfigSource(config)
    pool = ModelPool(FakeEngine, memory_budget=1 << 30, smoke_test=None)
    pool.add(FakeEngine(fake_info("a")))  # sync unloaded "b" (or has not activated it yet)
    reloader = Reloader(source, source.load(), pool)
    report = await reloader.reload("test")
    assert report.error is None
    assert report.models_added == added and report.store == store
    assert report.to_dict()["store"] == store
    assert sorted(m.id for m in pool.models()) == sorted({"a", *added})
    await pool.close()


@pytest.mark.parametrize(("hub", "added", "store"), SYNC_CASES)
def test_store_models_are_left_to_sync(tmp_path: Path, hub: str, added: tuple[str, ...], store: str) -> None:
    asyncio.run(_test_store_models_are_left_to_sync(tmp_path, hub, added, store))


async def _test_a_new_version_does_not_overwrite_an_entry_it_could_not_remove(tmp_path: Path) -> None:
    from agent.daemon.catalog import discover_store

    fleet, box = _store_box(tmp_path, "b")
    config = tmp_path / "config.toml"
    _write(config, f'state_dir = "{box.state_dir}"\n')
    source = ConfigSource(config)
    start = source.load()
    pool = ModelPool(
        lambda i: FakeEngine(i, FakeBehaviour(load_delay_s=1.0)), memory_budget=1 << 30, smoke_test=None
    )
    pool.add(FakeEngine(fake_info("a")))
    (b1,) = discover_store(start)
    pool.register(b1)
    fleet.model("b", version="2")
    box.import_bundle(fleet.bundle())
    (b2,) = discover_store(start)
    assert b2.path != b1.path
    reloader = Reloader(source, start, pool)
    swap = asyncio.create_task(pool.swap(b1))  # b becomes the default while the reload plans
    await asyncio.sleep(0.05)
    report = await reloader.reload("test")
    await swap
    assert report.error is None
    assert report.models_kept == ("b",) and report.models_added == () and report.models_removed == ()
    row = next(r for r in pool.status() if r.id == "b" and r.state != "retiring")
    assert (row.state, row.path, pool.default_id) == ("ready", str(b1.path), "b")
    await pool.close()


def test_a_new_version_does_not_overwrite_an_entry_it_could_not_remove(tmp_path: Path) -> None:
    asyncio.run(_test_a_new_version_does_not_overwrite_an_entry_it_could_not_remove(tmp_path))


# -- a failing store step after the live keys were applied -------------------------------------------


def _corrupt_enrollment(state: Path) -> None:
    (state / "registry").mkdir(parents=True)
    (state / "registry" / "enrollment.json").write_text("{")


def _corrupt_index(state: Path) -> None:
    _corrupt_enrollment(state)
    (state / "registry" / "enrollment.json").write_text(
        json.dumps({"device_id": "box-1", "groups": ["lab"], "root_sha256": "0" * 64, "enrolled_at": "now"})
    )
    (state / "registry" / "installed.json").write_text("not json")


BROKEN_STORES = [
    pytest.param(_corrupt_enrollment, "enrollment.json is corrupt", id="corrupt-enrollment"),
    pytest.param(_corrupt_index, "the installed index is corrupt", id="corrupt-index"),
]


async def _test_a_store_failure_keeps_what_was_applied(tmp_path: Path, breaks: Any, expected: str) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    _write(config, f'state_dir = "{state}"\n')
    source = ConfigSource(config)
    pool = _pool("a")
    reloader = Reloader(source, source.load(), pool)
    breaks(state)
    _write(config, f'state_dir = "{state}"\n[pool]\nkeep_alive_s = 5\n[engine]\nn_ctx = 1024\n')
    report = await reloader.reload("test")
    again = await reloader.reload("test")
    assert (report.outcome, report.error, report.store) == ("partial", None, "failed")
    assert report.store_error is not None and expected in report.store_error
    assert report.applied == ("pool.keep_alive_s",) and report.restart_needed == ("engine.n_ctx",)
    assert pool.keep_alive_s == 5 and reloader.settings.pool.keep_alive_s == 5
    assert again.changed == ("engine.n_ctx",)  # diffed against what was applied, not stale settings
    assert report.to_dict()["store_error"] == report.store_error
    assert "1 applied" in report.summary() and expected in report.summary()
    await pool.close()


@pytest.mark.parametrize(("breaks", "expected"), BROKEN_STORES)
def test_a_store_failure_keeps_what_was_applied(tmp_path: Path, breaks: Any, expected: str) -> None:
    asyncio.run(_test_a_store_failure_keeps_what_was_applied(tmp_path, breaks, expected))


RESPONSE_CASES = [
    pytest.param(ReloadReport("api", applied=("log.level",)), 200, None, id="ok"),
    pytest.param(
        ReloadReport("api", error="config error: log.level = 'loud'"), 400, "config_error", id="bad-config"
    ),
    pytest.param(
        ReloadReport("api", error="reload failed: KeyError: 'x'", internal=True),
        500,
        "internal_error",
        id="internal-failure",
    ),
    pytest.param(
        ReloadReport("api", applied=("log.level",), store="failed", store_error="NotEnrolled: corrupt"),
        500,
        "store_reload_failed",
        id="store-failed-after-apply",
    ),
]


@pytest.mark.parametrize(("report", "status", "code"), RESPONSE_CASES)
def test_reload_answer(report: ReloadReport, status: int, code: str | None) -> None:
    from agent.server.admin_routes import reload_response

    response = reload_response(report)
    assert isinstance(response.body, bytes)
    body = json.loads(response.body)
    assert response.status == status
    if code is None:
        assert body["outcome"] == "ok" and body["applied"] == ["log.level"]
    else:
        assert body["error"]["code"] == code and body["error"]["type"] in (
            "invalid_request_error",
            "server_error",
        )
        assert (body["error"]["type"] == "server_error") == (status == 500)
