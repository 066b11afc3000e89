"""should_switch: hysteresis for memory pressure and throttling, and pins."""

from __future__ import annotations

import pytest

from fleet.hardware import CgroupInfo, HardwareProfile, MemoryInfo
from fleet.memory import MIB, ModelShape
from fleet.selection import (
    Candidate,
    Observation,
    Selection,
    SelectionPolicy,
    SwitchHistory,
    SwitchPolicy,
    observe,
    select,
    should_switch,
)


def cand(model_id: str, params_m: int, bpw: float = 4.5) -> Candidate:
    size = int(params_m * 1_000_000 * bpw / 8)
    shape = ModelShape(
        file_size=size,
        n_layers=16,
        n_embd=1024,
        n_head=8,
        n_head_kv=(2,),
        key_length=128,
        value_length=128,
        n_vocab=32_000,
    )
    return Candidate(model_id, "synthetic", params_m * 1_000_000, "Q4", bpw, "gguf", "completion", shape)


BIG, SMALL = cand("big-3b", 3_000), cand("small-500m", 500)


def selection(available_mib: int) -> Selection:
    profile = HardwareProfile(memory=MemoryInfo(total_bytes=8 << 30, available_bytes=available_mib * MIB))
    return select(profile, [BIG, SMALL], SelectionPolicy(headroom_bytes=0))


ROOMY, TIGHT = selection(8000), selection(1000)


def history(*stressed: bool, last_switch_at: float | None = None) -> SwitchHistory:
    h = SwitchHistory(last_switch_at=last_switch_at)
    for i, s in enumerate(stressed):
        h = h.observe(Observation(at=1000.0 + 60 * i, pressure=s, throttled=False))
    return h


CASES = [
    (
        "down-after-sustained-pressure",
        "big-3b",
        TIGHT,
        history(True, True),
        SwitchPolicy(),
        True,
        "small-500m",
    ),
    ("down-waits-for-a-second-probe", "big-3b", TIGHT, history(False, True), SwitchPolicy(), False, "big-3b"),
    ("up-after-sustained-calm", "small-500m", ROOMY, history(*[False] * 5), SwitchPolicy(), True, "big-3b"),
    (
        "up-waits-for-calm",
        "small-500m",
        ROOMY,
        history(True, False, False),
        SwitchPolicy(),
        False,
        "small-500m",
    ),
    (
        "up-waits-after-a-recent-switch",
        "small-500m",
        ROOMY,
        history(*[False] * 5, last_switch_at=1200.0),
        SwitchPolicy(),
        False,
        "small-500m",
    ),
    ("stay-when-best", "big-3b", ROOMY, history(True, True), SwitchPolicy(), False, "big-3b"),
    (
        "pin-wins-over-pressure",
        "big-3b",
        TIGHT,
        history(True, True),
        SwitchPolicy(pin="big-3b"),
        False,
        "big-3b",
    ),
    ("pin-switches-to-the-pin", "small-500m", ROOMY, history(), SwitchPolicy(pin="other"), True, "other"),
    ("current-gone", "removed-model", ROOMY, history(), SwitchPolicy(), True, "big-3b"),
    ("nothing-loaded", None, TIGHT, history(), SwitchPolicy(), True, "small-500m"),
    (
        "nothing-fits-keeps-current",
        "big-3b",
        selection(10),
        history(True, True),
        SwitchPolicy(),
        False,
        "big-3b",
    ),
]


@pytest.mark.parametrize(
    ("current", "new", "hist", "policy", "switch", "target"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_should_switch(
    current: str | None, new: Selection, hist: SwitchHistory, policy: SwitchPolicy, switch: bool, target: str
) -> None:
    decision = should_switch(current, new, hist, policy)
    assert (decision.switch, decision.target) == (switch, target), decision.reason
    assert decision.reason


def test_alternating_stress_never_flaps() -> None:
    # A box that alternates between pressure and calm every probe never switches either way.
    h = SwitchHistory()
    current = "big-3b"
    switches = 0
    for i in range(40):
        stressed = i % 2 == 0
        h = h.observe(Observation(at=60.0 * i, pressure=stressed, throttled=False))
        decision = should_switch(current, TIGHT if stressed else ROOMY, h)
        if decision.switch:
            switches += 1
            current = decision.target or current
            h = SwitchHistory(h.observations, last_switch_at=60.0 * i)
    assert switches == 0


def test_observe_reads_pressure_and_throttling() -> None:
    tight = HardwareProfile(
        memory=MemoryInfo(available_bytes=4 << 30),
        cgroup=CgroupInfo("v2", "/", limit_bytes=1 << 30, usage_bytes=(1 << 30) - 100 * MIB),
        throttled=True,
    )
    obs = observe(tight, at=5.0, headroom_bytes=256 * MIB)
    assert (obs.pressure, obs.throttled, obs.stressed) == (True, True, True)
    calm = observe(
        HardwareProfile(memory=MemoryInfo(available_bytes=4 << 30)), at=6.0, headroom_bytes=256 * MIB
    )
    assert not calm.stressed
