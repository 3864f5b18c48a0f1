"""The bank's read/write lock: fair to a writer under steady readers, and to readers under writers.

Starvation is made deterministic rather than timed: the readers hand the lock over so that
one of them always holds it (a reader lets go only once the next one is in, or after a
short grace when the next one is held back), and the writers do the same. A lock that
favours readers never lets the writer in at all; the bounds below only stop a broken lock
from hanging the test.
"""

from __future__ import annotations

import threading
import time

import pytest

from moa.model.adapter_bank import BankBusyError, ReadWriteLock

BOUND = 20.0  # seconds: far beyond what a fair lock needs (milliseconds)
GRACE = 0.05  # how long a reader keeps the lock waiting for the next one


def _wait_until(condition, timeout: float = BOUND) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_a_writer_gets_in_under_steady_overlapping_readers():
    lock = ReadWriteLock()
    readers = 4
    stop = threading.Event()
    turns = [threading.Event() for _ in range(readers)]
    reads = [0] * readers
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            while not stop.is_set():
                if not turns[i].wait(0.01):
                    continue
                with lock.reading():
                    turns[i].clear()  # "I am in": the previous reader may let go now
                    reads[i] += 1
                    nxt = (i + 1) % readers
                    turns[nxt].set()  # hand over: the next reader comes in while this one holds
                    _wait_until(lambda: not turns[nxt].is_set() or stop.is_set(), GRACE)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    turns[0].set()
    assert _wait_until(lambda: sum(reads) > 20)  # the readers overlap, steadily
    got_in = threading.Event()

    def writer() -> None:
        with lock.writing():
            got_in.set()

    started = time.monotonic()
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        assert got_in.wait(BOUND), "the writer starved behind steady readers"
        waited = time.monotonic() - started
        assert sum(reads) > 20
    finally:
        stop.set()
        for t in [*threads, w]:
            t.join(BOUND)
    assert not errors
    assert waited < BOUND


def test_readers_get_in_under_steady_writers():
    lock = ReadWriteLock()
    stop = threading.Event()
    writes = [0, 0]

    def writer(i: int) -> None:
        while not stop.is_set():
            with lock.writing():
                writes[i] += 1
                time.sleep(0.002)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    assert _wait_until(lambda: sum(writes) > 10)
    got_in = threading.Event()

    def reader() -> None:
        with lock.reading():
            got_in.set()

    r = threading.Thread(target=reader, daemon=True)
    r.start()
    try:
        assert got_in.wait(BOUND), "the reader starved behind steady writers"
    finally:
        stop.set()
        for t in [*threads, r]:
            t.join(BOUND)


def test_a_waiting_writer_holds_new_readers_back_but_not_nested_reads():
    lock = ReadWriteLock()
    inside, release = threading.Event(), threading.Event()
    nested_ok, newcomer_in, writer_in = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def first_reader() -> None:
        with lock.reading():
            inside.set()
            assert _wait_until(lambda: lock.writers_waiting == 1)
            with lock.reading():  # re-entry while a writer waits: passes at once (else: deadlock)
                with pytest.raises(BankBusyError, match="inside a call"):
                    with lock.writing():  # the BankBusyError rule still holds
                        pass
                nested_ok.set()
            release.wait(BOUND)
            order.append("first reader out")

    def writer() -> None:
        with lock.writing():
            order.append("writer")
            writer_in.set()

    def newcomer() -> None:
        with lock.reading():
            order.append("newcomer")
            newcomer_in.set()

    r = threading.Thread(target=first_reader, daemon=True)
    r.start()
    assert inside.wait(BOUND)
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    assert nested_ok.wait(BOUND), "a nested read deadlocked behind the waiting writer"
    n = threading.Thread(target=newcomer, daemon=True)
    n.start()
    time.sleep(0.1)
    assert not newcomer_in.is_set(), "a new reader overtook the waiting writer"
    release.set()
    for t in (r, w, n):
        t.join(BOUND)
    assert order == ["first reader out", "writer", "newcomer"]


def test_the_writers_own_thread_may_read_and_readers_queued_go_before_the_next_writer():
    lock = ReadWriteLock()
    order: list[str] = []
    first_in, let_go = threading.Event(), threading.Event()

    def writer(name: str, hold: threading.Event | None) -> None:
        with lock.writing():
            with lock.reading():  # the writer's thread reads (the bank reads inside install)
                order.append(name)
            if hold is not None:
                first_in.set()
                hold.wait(BOUND)

    def reader() -> None:
        with lock.reading():
            order.append("reader")

    w1 = threading.Thread(target=writer, args=("writer 1", let_go), daemon=True)
    w1.start()
    assert first_in.wait(BOUND)
    r = threading.Thread(target=reader, daemon=True)
    r.start()
    time.sleep(0.05)  # the reader queues behind writer 1
    w2 = threading.Thread(target=writer, args=("writer 2", None), daemon=True)
    w2.start()
    assert _wait_until(lambda: lock.writers_waiting == 1)
    let_go.set()
    for t in (w1, r, w2):
        t.join(BOUND)
    assert order == ["writer 1", "reader", "writer 2"]


def test_a_copied_lock_is_fresh_and_unheld():
    import copy

    lock = ReadWriteLock()
    with lock.reading():
        copied = copy.deepcopy(lock)
        assert not copied.held_for_reading()
        with copied.writing():  # not blocked by the original's reader
            pass
