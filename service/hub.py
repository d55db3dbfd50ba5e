"""The hub owns the waiters of this instance and wakes them when a change arrives.

Data flows one way: a backend calls ``Hub.publish`` with each change (the memory backend right
after a write, the redis backend from its one pub/sub reader). Each waiter keeps the changes of
its key that it has not looked at yet, so none can fall between two waits; a waiter asleep is
woken through a future of its own. A change is serialized once, on first use, whatever the
number of waiters it reaches.

Two things keep a fan-out to thousands of waiters cheap and the rest of the instance responsive:

- A long poll that can take it (``Waiter.answer_directly``) is answered by the hub itself: the
  complete HTTP answer, built once per change, goes to every such connection, ``ANSWER_BATCH``
  connections per turn of the event loop, before their handlers run again (they only tidy up).
- Sleeping waiters are woken ``WAKE_BATCH`` at a time, one batch per turn of the event loop, so a
  write (or any request) that arrives meanwhile waits for one batch, not for the whole fan-out.
  A connection the hub answered is not read until its batch comes, after every answer due is
  written: the clients' re-polls, sent the moment the answers arrive, are then taken in batches
  too, and do not hold back the answers still to write.

A wake-up is a hint: waiters compare versions (or cursors) and ignore stale or duplicate changes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from types import TracebackType

from .activity import Activity
from .model import Cursor, TaskState, WatchBatch

WATCH_KEY = "*"  # not a valid task id, so it never collides with one
# Waiters woken (and answered connections read again) per turn of the event loop: ~2 ms of
# handler work and re-polls at the measured cost, so a write arriving during a storm of re-polls
# waits a few short turns (bench: 32 against 128 took a write's ack from ~35 to ~20 ms).
WAKE_BATCH = 32
# Direct answers written per turn of the loop, so a write arriving meanwhile waits for a batch,
# not for 10,000 answers. A turn of 512 took ~15 ms of wall time with the clients busy on the
# other core (event-loop lag, 10,000 polls): a write during the fan-out then waited 33 ms at p50
# and ~150 at p99. Bench, 10,000 polls, three runs each: 128 per turn 12-13 / 44-60 ms, 64 7-9 /
# 19-38 ms, 32 5 / 16-73 ms; time-to-last alike for all (64: 159-207 ms, 512: 169-200).
ANSWER_BATCH = 64
LATEST_KEPT = 1024  # tasks whose last change the hub keeps, to answer polls that are behind
# Holds end on a clock of this period, one timer per tick for all the waits ending in it (a timer
# per wait costs ~700 bytes and a heap entry). A deadline is rounded up: a wait ends at most one
# tick late (``api._poll_timeout`` takes the tick out of the hold it asks for).
TICK = 0.05

AnswerEncoder = Callable[["Change"], bytes]


class Change:
    """One accepted write as every instance sees it: the new state and its place in the stream.

    The hub fills in the response bodies when it publishes, once per change and only for the
    kinds of waiter present, whatever their number.
    """

    __slots__ = ("_answer", "_body", "_watch_body", "cursor", "state")

    def __init__(self, state: TaskState, cursor: Cursor) -> None:
        self.state = state
        self.cursor = cursor
        self._body: bytes | None = None
        self._watch_body: bytes | None = None
        self._answer: bytes | None = None

    @property
    def body(self) -> bytes:
        """The state as a JSON response body, shared by every poll of the task it reaches
        (encoded by ``publish`` when the task has waiters, else on first use)."""
        if self._body is None:
            self.encode_body()
            assert self._body is not None
        return self._body

    @property
    def watch_body(self) -> bytes:
        """The answer to every watch whose cursor is just before this change."""
        assert self._watch_body is not None, "published to watches without a body"
        return self._watch_body

    def encode_body(self) -> None:
        self._body = json.dumps(self.state.to_dict()).encode()

    def encode_watch_body(self) -> None:
        batch = WatchBatch(cursor=self.cursor, tasks=[self.state])
        self._watch_body = json.dumps(batch.to_dict()).encode()

    def answer(self, encode: AnswerEncoder) -> bytes:
        """The whole HTTP answer to a long poll (head and ``body``), encoded on first use."""
        if self._answer is None:
            self._answer = encode(self)
        return self._answer


class DirectAnswer:
    """Where the hub writes a long poll's answer itself: the connection and what it has."""

    __slots__ = ("since", "transport")

    def __init__(self, transport: asyncio.Transport, since: int) -> None:
        self.transport = transport
        self.since = since


class Waiter:
    """One held request's place in the hub, registered for as long as its ``with`` block runs.

    Enter it BEFORE reading the current version: a change published after the read is then
    already in the waiter's pending changes, so no wake-up can fall between the read and the wait.
    """

    __slots__ = ("_direct", "_due", "_expiry", "_hub", "_key", "_pending", "_wake", "delivered")

    def __init__(self, hub: Hub, key: str) -> None:
        self._hub = hub
        self._key = key
        self._pending: list[Change] = []  # published since registering, not looked at yet
        self._wake: asyncio.Future[None] | None = None  # set while the waiter sleeps
        self._direct: DirectAnswer | None = None
        self._due: Change | None = None  # accepted for a direct answer not written yet
        self._expiry = 0  # the tick of this wait's deadline; -1 once it has passed
        self.delivered: Change | None = None  # the change whose answer the hub wrote itself

    def __enter__(self) -> Waiter:
        # A handler starts to wait: work for the idle watchers (a parked poll's bytes nudged
        # already, in ``PollConnection.data_received``; with FAST_POLL=0 this is the one).
        self._hub.activity.nudge()
        self._hub._register(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.delivered is None:
            self._direct = None  # (else the hub still has to resume reading its connection)
        self._hub._unregister(self, disconnected=exc_type is asyncio.CancelledError)

    def answer_directly(self, transport: asyncio.Transport, since: int) -> None:
        """Let the hub write this long poll's answer (``Hub(answer=...)``) for the first change
        of the task above version ``since``, the moment it is published.

        Not when a change above ``since`` is already pending: that one is answered the ordinary
        way, at once. Changes pending at or below ``since`` are dropped (the wait would turn
        them down): on Redis, a poll often reads the version its client already has while the
        change that made it is still on its way to this instance.
        """
        if not self._hub.answers_directly:
            return
        if any(change.state.version > since for change in self._pending):
            return
        self._pending.clear()
        self._direct = DirectAnswer(transport, since)

    async def wait(
        self, accept: Callable[[Change], bool], hold: float, *, newest: bool = False
    ) -> Change | None:
        """The first change ``accept`` takes (with ``newest``: the last one of those pending),
        or None after ``hold`` seconds or once the hub is closed.

        Changes are offered in the order they were published, each once; those turned down are
        dropped, those after the one taken stay for the next wait.
        """
        loop = self._hub.loop()
        deadline = loop.time() + hold
        self._expiry = 0
        while True:
            if self.delivered is not None:
                return self.delivered
            due = self._due
            if due is not None:  # woken (timeout, shutdown) before the hub answered it
                self._due = self._direct = None
                return due
            found = None
            while self._pending:
                change = self._pending.pop(0)
                if accept(change):
                    found = change
                    if not newest:
                        break
            if found is not None:
                return found
            if self._hub.closed or self._expiry < 0 or loop.time() >= deadline:
                return None
            self._wake = loop.create_future()
            self._hub._expire_at(self, deadline)
            try:
                await self._wake
            finally:
                self._wake = None

    def _offer(self, change: Change) -> bool:
        """Hub side: take ``change``; whether the hub must then answer or wake the waiter (a
        waiter answered directly is both, in that order: ``_write_answer``, then ``_release``)."""
        if self.delivered is not None:
            return False  # answered: it only has to finish
        direct = self._direct
        if direct is not None and change.state.version > direct.since:
            first = self._due is None
            self._due = change  # the newest one is the one its answer will carry
            return first
        self._pending.append(change)
        wake = self._wake
        return wake is not None and not wake.done()

    def _write_answer(self, encode: AnswerEncoder) -> None:
        """Hub side: write the answer that is due, unless the waiter took it itself meanwhile."""
        change, direct = self._due, self._direct
        if change is None or direct is None:
            return
        self._due = None
        if direct.transport.is_closing():  # the client left: its handler is cancelled soon
            self._direct = None
            self._pending.append(change)
            return
        direct.transport.write(change.answer(encode))
        # The client asks again as soon as it reads this: leave its next request in the socket
        # until ``_release``, so the re-polls of a fan-out come in batches too.
        direct.transport.pause_reading()
        self.delivered = change

    def _release(self) -> None:
        """Hub side, a batch at a time: wake the waiter, and read its connection again."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        if self.delivered is not None:
            direct, self._direct = self._direct, None
            if direct is not None and not direct.transport.is_closing():
                direct.transport.resume_reading()

    def _time_up(self) -> None:
        """Hub side: the wait's deadline has passed (its tick came)."""
        wake = self._wake
        if wake is not None and not wake.done():
            self._expiry = -1
            wake.set_result(None)

    def _hub_closed(self) -> None:
        """Hub side: the hub is closing; a sleeping waiter returns (its handler answers 204)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    @property
    def parked(self) -> bool:
        """Asleep, or handed to the hub for a direct answer (not still reading the store)."""
        return self._wake is not None or self._direct is not None


class Hub:
    def __init__(self, answer: AnswerEncoder | None = None) -> None:
        """``answer`` encodes a change as the complete HTTP answer to a long poll of its task;
        without it, every waiter answers through its handler."""
        self._answer = answer
        # key -> its waiters, in the order they came (a dict as an ordered set)
        self._waiters: dict[str, dict[Waiter, None]] = {}
        self._total = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expiring: dict[int, list[Waiter]] = {}  # tick -> waiters whose wait ends in it
        # The fan-out in progress (see ``_drain``): sleeping waiters to wake, answers to write,
        # then the connections answered to read again.
        self._wakes: deque[Waiter] = deque()
        self._answers: deque[Waiter] = deque()
        self._answered: deque[Waiter] = deque()
        self._resumes: deque[asyncio.Transport] = deque()  # answered at once (``answer_now``)
        self._draining = False
        # task -> its last change, for answering polls that are behind (``latest``)
        self._latest: OrderedDict[str, Change] = OrderedDict()
        self._disconnected = 0  # waiters whose client went away, since the last report
        self.serializations = 0  # response bodies built by publish, for all waiters together
        self.direct_answers = 0  # long polls the hub answered itself
        self.activity = Activity()  # nudged where work enters, for the idle watchers

    # --- the backend side ---------------------------------------------------------------------

    def publish(self, change: Change) -> None:
        self.activity.nudge()
        task = change.state.task
        self._remember(task, change)
        task_waiters = self._waiters.get(task)
        if task_waiters:
            change.encode_body()
            self.serializations += 1
            self._offer(task_waiters, change)
        watches = self._waiters.get(WATCH_KEY)
        if watches:
            change.encode_watch_body()
            self.serializations += 1
            self._offer(watches, change)

    def _offer(self, waiters: dict[Waiter, None], change: Change) -> None:
        for waiter in tuple(waiters):
            if waiter._offer(change):
                if waiter._due is change:
                    self._answers.append(waiter)
                else:
                    self._wakes.append(waiter)
        if not self._draining:
            self._drain()  # the first turn at once: a small fan-out is done here and now

    def _remember(self, task: str, change: Change) -> None:
        latest = self._latest
        latest[task] = change
        latest.move_to_end(task)
        if len(latest) > LATEST_KEPT:
            latest.popitem(last=False)

    def latest(self, task: str) -> Change | None:
        """The last change of ``task`` (of the ``LATEST_KEPT`` tasks most recently changed): what
        a poll that is behind is answered with. Every change is kept, watched or not: a poll
        that is behind finds the state it is answered with here, whoever was waiting then."""
        return self._latest.get(task)

    def answer_now(self, transport: asyncio.Transport, change: Change) -> bool:
        """Answer a poll that is behind with ``change`` (the current state) the way the hub
        answers a held one: its prebuilt answer, then the connection read again in its turn.
        False when this hub has no answers to give (the caller answers the ordinary way)."""
        if self._answer is None or transport.is_closing():
            return False
        transport.write(change.answer(self._answer))
        transport.pause_reading()
        self._resumes.append(transport)
        self.direct_answers += 1
        if not self._draining:  # next turn, not now: a turn now would read it again at once
            self._draining = True
            self.loop().call_soon(self._drain)
        return True

    def _drain(self) -> None:
        """One turn of the fan-out: up to ``WAKE_BATCH`` sleeping waiters woken and
        ``ANSWER_BATCH`` answers written; once every answer is written, the connections answered
        are read again, ``WAKE_BATCH`` a turn (the first answered first, then the polls answered
        at once); again next turn if more. (A parked poll's connection is read all along: its
        re-poll is kept until then, any other request ends it at once, ``fastpoll``.) Answers
        before re-reads: re-polls handled between the batches of answers would delay the last
        answer and take CPU from the clients reading them (bench, 10,000 polls, three runs
        each: time-to-last 182 against 196 ms, a write meanwhile 31 against 41 ms at p50)."""
        wakes, answers = self._wakes, self._answers
        answered, resumes = self._answered, self._resumes
        try:
            for _ in range(min(WAKE_BATCH, len(wakes))):
                wakes.popleft()._release()
            if answers:
                assert self._answer is not None  # only a hub that answers has answers due
                for _ in range(min(ANSWER_BATCH, len(answers))):
                    waiter = answers.popleft()
                    answered.append(waiter)
                    waiter._write_answer(self._answer)
                    if waiter.delivered is not None:
                        self.direct_answers += 1
            budget = 0 if answers else WAKE_BATCH
            for _ in range(min(budget, len(answered))):
                answered.popleft()._release()
                budget -= 1
            for _ in range(min(budget, len(resumes))):
                transport = resumes.popleft()
                if not transport.is_closing():
                    transport.resume_reading()
        finally:
            # Even if one connection failed (it was taken off its queue): the others, and every
            # later change, still need their turns.
            self._draining = bool(wakes or answers or answered or resumes)
            if self._draining:
                self.loop().call_soon(self._drain)

    def _expire_at(self, waiter: Waiter, deadline: float) -> None:
        tick = waiter._expiry = math.ceil(deadline / TICK)
        waiters = self._expiring.get(tick)
        if waiters is None:
            waiters = self._expiring[tick] = []
            self.loop().call_at(tick * TICK, self._expire, tick)
        waiters.append(waiter)

    def _expire(self, tick: int) -> None:
        self.activity.nudge()
        for waiter in self._expiring.pop(tick, ()):
            if waiter._expiry == tick:
                waiter._time_up()

    def close(self) -> None:
        """Release every waiter (they answer 204), e.g. on shutdown; later waits return at once."""
        self._closed = True
        for waiter in [w for waiters in self._waiters.values() for w in waiters]:
            waiter._hub_closed()

    # --- the handler side ---------------------------------------------------------------------

    def waiting(self, key: str) -> Waiter:
        """A waiter on ``key`` (a task id or ``WATCH_KEY``), registered while its block runs."""
        return Waiter(self, key)

    def park(self, waiter: Waiter, hold: float) -> None:
        """Hold ``waiter``, which has no handler of its own (``fastpoll.ParkedPoll``), until the
        hub answers it, its ``hold`` passes (``_time_up``) or it is ``unpark``-ed."""
        self._register(waiter)
        self._expire_at(waiter, self.loop().time() + hold)

    def unpark(self, waiter: Waiter, *, disconnected: bool) -> None:
        self._unregister(waiter, disconnected=disconnected)

    def _register(self, waiter: Waiter) -> None:
        key = waiter._key
        waiters = self._waiters.get(key)
        if waiters is None:
            waiters = self._waiters[key] = {}
        waiters[waiter] = None
        self._total += 1

    def _unregister(self, waiter: Waiter, *, disconnected: bool) -> None:
        key = waiter._key
        if disconnected:
            self._disconnected += 1  # handler_cancellation: the client closed its connection
        self._total -= 1
        waiters = self._waiters[key]
        del waiters[waiter]
        if not waiters:
            del self._waiters[key]

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once (the lookup is a system call on Python 3.11)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- what the hub can tell ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """A fan-out is in progress: answers to write or waiters to release on later turns."""
        return self._draining

    @property
    def answers_directly(self) -> bool:
        return self._answer is not None

    @property
    def waiting_total(self) -> int:
        return self._total

    def parked(self) -> int:
        """How many waiters are parked: asleep, or handed to the hub for a direct answer (not
        still reading the store, as a waiter is right after registering). Counts every waiter:
        for tests and diagnostics, not for a hot path."""
        return sum(1 for waiters in self._waiters.values() for waiter in waiters if waiter.parked)

    @property
    def waiting_watches(self) -> int:
        return len(self._waiters.get(WATCH_KEY, ()))

    @property
    def waiting_polls(self) -> int:
        return self._total - self.waiting_watches

    def take_disconnected(self) -> int:
        """How many waiters were cleaned up after their client disconnected, since the last call."""
        count, self._disconnected = self._disconnected, 0
        return count

    def watched_tasks(self) -> list[str]:
        """Task ids that have waiters now (the redis backend re-reads these after a reconnect)."""
        return [key for key in self._waiters if key != WATCH_KEY]
