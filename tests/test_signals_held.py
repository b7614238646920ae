"""signals_held: Ctrl-C and SIGTERM inside the block arrive when it ends, every one of them."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from h0mini.interrupt import signals_held


def test_a_signal_inside_the_block_is_delivered_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_does_not_swallow_a_sigterm_that_came_with_it():
    terms = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: terms.append(number))
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
        assert terms == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_ignored_signal_stays_ignored_and_other_threads_run_the_block_as_is():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    ran, errors = [], []

    def elsewhere():
        try:
            with signals_held():
                ran.append(True)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert ran == [True] and not errors
