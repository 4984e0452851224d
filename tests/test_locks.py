"""lattice.transport.locks: the muxer's send and write locks and the RPC call slots."""

import pytest
import trio
import trio.testing

from lattice.transport.locks import FairLock, FairSemaphore


async def test_lock_excludes_and_hands_over_in_order():
    lock = FairLock()
    order: list[int] = []
    inside = 0

    async def worker(i: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1
            order.append(i)
            await trio.sleep(0.001)
            inside -= 1

    async with trio.open_nursery() as nursery:
        await lock.acquire()
        for i in range(5):
            nursery.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert order == [0, 1, 2, 3, 4]
    assert not lock.held


async def test_lock_nowait_and_release_errors():
    lock = FairLock()
    lock.acquire_nowait()
    with pytest.raises(trio.WouldBlock):
        lock.acquire_nowait()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_cancelled_waiter_leaves_the_lock_free():
    lock = FairLock()
    lock.acquire_nowait()
    with trio.move_on_after(0.01):
        await lock.acquire()  # times out while parked
    lock.release()
    assert not lock.held
    lock.acquire_nowait()  # nobody else holds or waits for it


async def test_cancelled_before_acquire_does_not_take_the_lock():
    lock = FairLock()
    with trio.CancelScope() as scope:
        scope.cancel()
        await lock.acquire()
    assert not lock.held


async def test_semaphore_bounds_and_serves_in_order():
    slots = FairSemaphore(2)
    slots.acquire_nowait()
    slots.acquire_nowait()
    with pytest.raises(trio.WouldBlock):
        slots.acquire_nowait()
    got: list[int] = []

    async def waiter(i: int) -> None:
        await slots.acquire()
        got.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
        assert got == []
        slots.release()
        await trio.testing.wait_all_tasks_blocked()
        assert got == [0]
        slots.release()
        await trio.testing.wait_all_tasks_blocked()
        slots.release()
    assert got == [0, 1, 2]
    assert slots.value == 0
    for _ in range(3):
        slots.release()
    assert slots.value == 3  # as trio.Semaphore without a maximum


async def test_semaphore_cancelled_waiter_keeps_the_count():
    slots = FairSemaphore(1)
    slots.acquire_nowait()
    with trio.move_on_after(0.01):
        await slots.acquire()
    slots.release()
    assert slots.value == 1
