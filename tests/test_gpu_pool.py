"""The local runtime's GPU pool as pure bookkeeping: detection, disjoint grants, the line,
and which idle instances to stop to make room (no GPU needed: device lists are simulated)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfless.runtime.gpu_pool import GpuPool, GpuPoolError, detect_devices, detect_slots


def test_devices_come_from_the_env_or_the_visible_cuda_devices():
    assert detect_devices({"RLHFLESS_GPUS": "0,1, 3"}, count=lambda: 0) == ("0", "1", "3")
    assert detect_devices({"RLHFLESS_GPUS": ""}, count=lambda: 8) == ()  # opt out
    assert detect_devices({}, count=lambda: 4) == ("0", "1", "2", "3")
    # Children must name the same devices this process sees: reuse its own names.
    assert detect_devices({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, count=lambda: 4) == \
        ("4", "5", "6", "7")
    assert detect_devices({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, count=lambda: 1) == ("GPU-a",)
    assert detect_devices({}, count=lambda: 0) == ()
    for bad in ("0,,1", "1,1"):
        with pytest.raises(GpuPoolError, match="RLHFLESS_GPUS"):
            detect_devices({"RLHFLESS_GPUS": bad})
    assert detect_slots({}) == 1 and detect_slots({"RLHFLESS_GPU_SLOTS": "3"}) == 3
    with pytest.raises(GpuPoolError, match="RLHFLESS_GPU_SLOTS"):
        detect_slots({"RLHFLESS_GPU_SLOTS": "0"})


def test_grants_are_disjoint_and_a_request_that_does_not_fit_waits():
    pool = GpuPool(tuple("01234567"))
    for name in ("a", "b", "c"):
        pool.request(name, 2)
        assert pool.grant(name) is not None
    assert pool.held() == {"a": ("0", "1"), "b": ("2", "3"), "c": ("4", "5")}
    pool.request("big", 4)
    assert pool.grant("big") is None and pool.free_slots() == 2  # never oversubscribed
    pool.release("b")
    assert pool.grant("big") == ("2", "3", "6", "7")
    assert pool.waiting() == [] and pool.free_slots() == 0


def test_the_line_is_first_come_first_served():
    pool = GpuPool(("0", "1"))
    pool.request("holder", 1)
    pool.grant("holder")
    pool.request("pair", 2)
    pool.request("single", 1)
    assert pool.grant("single") is None  # fits, but the pair came first
    pool.cancel("pair")
    assert pool.grant("single") == ("1",)


def test_impossible_and_duplicate_requests_are_errors():
    pool = GpuPool(("0", "1"))
    assert pool.impossible(3) and not pool.impossible(2)
    with pytest.raises(GpuPoolError, match="3 GPUs, the pool has 2"):
        pool.request("x", 3)
    pool.request("x", 1)
    with pytest.raises(GpuPoolError, match="already"):
        pool.request("x", 1)


def test_victims_are_the_fewest_least_recently_used_idle_holders():
    pool = GpuPool(("0", "1", "2", "3"))
    for name in ("old", "mid", "new", "busy"):
        pool.request(name, 1)
        pool.grant(name)
    pool.request("pair", 2)
    # idle, least recently used first; "busy" is not offered
    assert pool.victims(["old", "mid", "new"]) == ["old", "mid"]
    # one already being stopped counts as leaving: only one more is needed
    assert pool.victims(["mid", "new"], leaving=["old"]) == ["mid"]
    # both leaving: it will fit once they are gone, stop nobody else
    assert pool.victims(["new"], leaving=["old", "mid"]) == []
    pool.request("pair-after", 2)
    pool.cancel("pair")
    pool.request("quad", 4)  # behind "pair-after"; only the head counts
    assert pool.victims(["old"]) == []  # one idle holder cannot make room for a pair


def test_slots_let_instances_share_a_device_and_bill_a_share():
    pool = GpuPool(("0",), slots=3)
    for name in ("actor", "reference", "trainer"):
        pool.request(name, 1)
        assert pool.grant(name) == ("0",)
    pool.request("fourth", 1)
    assert pool.grant("fourth") is None
    assert pool.share == pytest.approx(1 / 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["req", "grant", "release", "cancel"]),
                          st.integers(0, 5), st.integers(1, 3)), max_size=60),
       st.integers(1, 2))
def test_never_oversubscribed(ops, slots):
    pool = GpuPool(("0", "1", "2"), slots=slots)
    for op, who, n in ops:
        name = f"i{who}"
        if op == "req" and name not in pool.held() and name not in pool.waiting():
            pool.request(name, n)
        elif op == "grant":
            pool.grant(name)
        elif op == "release":
            pool.release(name)
        elif op == "cancel":
            pool.cancel(name)
        load = {d: 0 for d in pool.devices}
        for devices in pool.held().values():
            assert len(set(devices)) == len(devices)  # distinct devices per instance
            for d in devices:
                load[d] += 1
        assert all(v <= slots for v in load.values())
        assert pool.free_slots() == sum(slots - v for v in load.values())
