"""`when`, the tests' "act as soon as this holds": a condition that never holds fails the test, by name."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import when


def test_the_action_runs_once_the_condition_holds() -> None:
    ready, ran = threading.Event(), threading.Event()
    watcher = when(ready.is_set, ran.set)
    ready.set()
    watcher.join()
    assert ran.is_set()


def test_a_condition_that_never_holds_fails_the_test_naming_it_and_the_action_is_not_run() -> None:
    ran = threading.Event()
    watcher = when(lambda: "never" == "true", ran.set, limit_s=0.05)
    with pytest.raises(pytest.fail.Exception, match=r'did not hold in time .*lambda: "never" == "true"'):
        watcher.join()
    assert not ran.is_set()


def test_an_action_that_raises_fails_the_join() -> None:
    def boom() -> None:
        raise RuntimeError("the action broke")

    with pytest.raises(RuntimeError, match="the action broke"):
        when(lambda: True, boom).join()


def test_a_condition_that_raises_fails_the_join() -> None:
    ran = threading.Event()
    with pytest.raises(ZeroDivisionError):
        when(lambda: 1 / 0, ran.set).join()
    assert not ran.is_set()
