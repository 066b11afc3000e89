"""Through the real daemon: POST /admin/select hot-swaps while a stream runs; /admin/pin; refusals."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from registry.metadata import Deployment, DeploymentEntry, deployment_target_path
from tests.daemon import running_daemon, uds_client
from tests.selection.conftest import quantize_variant
from tests.sync.helpers import enrolled_device, new_repo, publish_model

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_select_swaps_under_a_running_stream_then_pin_and_refusals(tmp_path: Path, gemma_path: Path) -> None:
    # Two real models in the signed store, as a fleet device holds them.
    repo = new_repo(tmp_path / "repo")
    publish_model(repo, gemma_path, "gemma-a", group=None)
    publish_model(repo, quantize_variant(gemma_path, "Q4_0"), "gemma-b", group=None)
    both = Deployment("edge", (DeploymentEntry("gemma-a", "1"), DeploymentEntry("gemma-b", "1")))
    repo.add_bytes(deployment_target_path("edge"), both.to_json(), {"kind": "deployment"})
    repo.publish()
    bundle = repo.export_bundle(tmp_path / "bundle")
    enrolled_device(tmp_path / "state", tmp_path / "repo", "dev-admin").import_bundle(bundle)
    env = {"EDGE_AGENT_ENGINE__N_THREADS": "2", "EDGE_AGENT_SERVER__SHUTDOWN_GRACE_S": "60"}
    with running_daemon(tmp_path / "state", None, env=env) as d, uds_client(d.socket) as c:
        before = c.get("/admin/status").json()
        old = before["default_model"]
        new = "gemma-b" if old == "gemma-a" else "gemma-a"
        events: list[dict[str, object]] = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": True}
            body["stream_options"] = {"include_usage": True}
            with uds_client(d.socket) as s, s.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        events.append({"done": True} if data == "[DONE]" else json.loads(data))
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60)
        swapped = c.post("/admin/select", json={"model": new})
        assert swapped.status_code == 200, swapped.text
        assert (swapped.json()["previous"], swapped.json()["current"]) == (old, new)
        after = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert after.status_code == 200 and after.json()["model"] == new
        t.join(120)
        assert events[-1] == {"done": True}
        assert {e.get("model") for e in events if "model" in e} == {old}
        usage = [e["usage"] for e in events if e.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 64  # type: ignore[index]

        pinned = c.post("/admin/pin", json={"model": new, "pinned": True})
        assert pinned.status_code == 200 and pinned.json()["pinned"] is True
        refusals = {
            "unknown-model": (c.post("/admin/select", json={"model": "nope"}), 404),
            "no-model": (c.post("/admin/select", json={}), 400),
            "bad-pinned": (c.post("/admin/pin", json={"model": new, "pinned": "yes"}), 400),
        }
        for name, (response, status) in refusals.items():
            assert response.status_code == status, (name, response.text)
            assert "error" in response.json(), name
        metrics = c.get("/metrics").text
        assert 'edge_agent_selection_changes_total{outcome="ok"} 1.0' in metrics
