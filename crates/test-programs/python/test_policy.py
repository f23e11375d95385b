"""The Python test policy (componentize-py): built from source once per test run by
tests/it/support/policy.rs and used by the tests of real Python policies.

rank = priority + the integer label `rank` (so a test can ask for any order), plus
`main_boost` for `branch=main`. Misbehaviour on demand, by config:
  sleep_in = configure | on-wait, sleep_ms = N   -> time.sleep (WASI clocks)
and by label: a ticket labelled `trap=yes` makes `rank` raise (a trap).
"""

import time
from typing import List, Optional, Tuple

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

settings = {"main_boost": 100, "sleep_in": "", "sleep_ms": 0}


class WitWorld(wit_world.WitWorld):
    def configure(self, config: List[Tuple[str, str]]) -> None:
        for key, value in config:
            if key not in settings:
                raise Err(f"unknown config key {key!r} (known: {', '.join(sorted(settings))})")
            settings[key] = value if key == "sleep_in" else int(value)
        if settings["sleep_in"] == "configure":
            time.sleep(settings["sleep_ms"] / 1000)


def rank_of(t: types.Ticket) -> int:
    labels = dict(t.request.labels)
    if labels.get("trap") == "yes":
        raise RuntimeError(f"asked to trap on ticket {t.id}")
    r = t.request.priority + int(labels.get("rank", "0"))
    if labels.get("branch") == "main":
        r += settings["main_boost"]
    return r


def key(t: types.Ticket):
    return (-rank_of(t), t.request.enqueued_at_ms, t.id)


class LockPolicy(exports.LockPolicy):
    def rank(self, waiter: types.Ticket, now_ms: int) -> int:
        return rank_of(waiter)

    def on_wait(self, state: types.WaitState) -> types.WaitDecision:
        if settings["sleep_in"] == "on-wait":
            host.log(types.Level.INFO, "sleeping in on-wait")
            time.sleep(settings["sleep_ms"] / 1000)
        limit = state.me.request.wait_limit_ms
        if limit is not None and state.waited_ms >= limit:
            return types.WaitDecision_GiveUp(f"waited {state.waited_ms} ms, the caller's limit")
        mine = key(state.me)
        position = sum(1 for t in state.waiters if key(t) < mine)
        return types.WaitDecision_KeepWaiting(min(20 * (position + 1), 1000))


class DockerdPolicy(exports.DockerdPolicy):
    def start_timeout_ms(self, attempt: types.StartAttempt) -> int:
        return 300_000

    def on_start_failure(self, attempt, failure, log_tail: str) -> types.RetryDecision:
        return types.RetryDecision_GiveUp("dockerd did not start")

    def stop_timeout_ms(self, cache_id: Optional[str]) -> int:
        return 30_000
