"""The {{name}} cachelock policy (Python, built with componentize-py).

Implements the world cachelock:policy/policy@0.1.0 (wit/policy.wit). This one ranks by
priority, with `branch=main` ahead of everything else of the same priority (config key
`main_boost`); waiting and dockerd decisions follow builtin:default's rules.
"""

from typing import List, Optional, Tuple

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

CONTAINERD_TIMEOUT = "failed to start containerd: timeout waiting for containerd to start"

main_boost = 100


class WitWorld(wit_world.WitWorld):
    def configure(self, config: List[Tuple[str, str]]) -> None:
        """Called once with the policy file's `config` map; raise Err to refuse it."""
        global main_boost
        for key, value in config:
            if key == "main_boost":
                try:
                    main_boost = int(value)
                except ValueError:
                    raise Err(f"main_boost: {value!r} is not an integer")
            else:
                raise Err(f"unknown config key {key!r} (known: main_boost)")


def rank_of(t: types.Ticket) -> int:
    boost = main_boost if ("branch", "main") in t.request.labels else 0
    return t.request.priority + boost


def goes_before(a: types.Ticket, b: types.Ticket) -> bool:
    """The host's order: highest rank, then earliest arrival, then smallest id."""
    return (-rank_of(a), a.request.enqueued_at_ms, a.id) < (-rank_of(b), b.request.enqueued_at_ms, b.id)


class LockPolicy(exports.LockPolicy):
    def rank(self, waiter: types.Ticket, now_ms: int) -> int:
        return rank_of(waiter)

    def on_wait(self, state: types.WaitState) -> types.WaitDecision:
        limit = state.me.request.wait_limit_ms
        if limit is not None and state.waited_ms >= limit:
            return types.WaitDecision_GiveUp(f"waited {state.waited_ms / 1000:.1f}s, the caller's limit")
        position = sum(1 for t in state.waiters if goes_before(t, state.me))
        if state.evaluations == 0 and position > 0:
            host.log(types.Level.DEBUG, f"{state.me.id}: {position} ahead")
        return types.WaitDecision_KeepWaiting(min(20 * (position + 1), 1000))


class DockerdPolicy(exports.DockerdPolicy):
    def start_timeout_ms(self, attempt: types.StartAttempt) -> int:
        return 300_000

    def on_start_failure(
        self, attempt: types.StartAttempt, failure: types.StartFailure, log_tail: str
    ) -> types.RetryDecision:
        if attempt.attempt < 5 and CONTAINERD_TIMEOUT in log_tail:
            return types.RetryDecision_RetryAfter(5_000)
        return types.RetryDecision_GiveUp("dockerd did not start")

    def stop_timeout_ms(self, cache_id: Optional[str]) -> int:
        return 30_000
