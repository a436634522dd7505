"""agent.contract.fence.ReplayFence: the retained-replay barrier, without a broker."""

from __future__ import annotations

from agent.contract.fence import ReplayFence


def test_passes_only_when_the_armed_token_comes_back() -> None:
    fence = ReplayFence("edge/controllers/ctl-1/fence")
    assert not fence.passed
    assert not fence.on_message("edge/nodes/gw-1/status", b"x")  # not the fence's: not consumed
    assert fence.on_message(fence.topic, b"")  # consumed, but nothing was armed yet
    assert not fence.passed
    token = fence.arm()
    assert token
    assert fence.on_message(fence.topic, b"someone else's")
    assert not fence.passed
    assert fence.on_message(fence.topic, token)
    assert fence.passed


def test_a_late_old_token_does_not_pass_a_re_armed_fence() -> None:
    fence = ReplayFence("t/fence")
    old = fence.arm()
    fence.reset()  # connection lost: await the replay again
    new = fence.arm()
    assert new != old
    fence.on_message("t/fence", old)
    assert not fence.passed
    fence.on_message("t/fence", new)
    assert fence.passed


def test_arm_keeps_passed_and_reset_clears_it() -> None:
    fence = ReplayFence("t/fence")
    fence.on_message("t/fence", fence.arm())
    assert fence.passed
    fence.arm()  # a reconnect re-arms; only a lost connection resets
    assert fence.passed
    fence.reset()
    assert not fence.passed
