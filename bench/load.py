"""The load generator: worker processes that hold N real HTTP/1.1 long polls, and a writer.

Each worker process runs one asyncio loop of raw ``asyncio.Protocol`` connections: no HTTP client
library, the parse of an answer is a few bytes operations (``python -m bench.load`` compares its
cost per request with aiohttp's client). A poller asks again the moment an answer arrives, as the
page does, and records ``(task, version, receive time)`` for every 200. Every time is
``time.monotonic()``, one clock for all processes of the machine, so the coordinator measures each
delivery from the moment it sent the update.

The coordinator (``LoadClient``) drives the workers over pipes, one command and one reply at a
time; every wait has a deadline, every loop a bound. Workers raise RLIMIT_NOFILE to the hard limit
and run with the cyclic GC off (they make no cycles), so the client is not the pause it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import random
import resource
import socket
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from .dialects import DIALECTS, NO_STATE, Dialect, PollState

MAX_RECONNECTS = (
    10  # per connection and phase: a target that keeps dropping us is not retried forever
)
CONNECT_TIMEOUT = 10.0
RETRY_DELAY = 0.2  # seconds before asking again after an error answer


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- one HTTP/1.1 connection ------------------------------------------------------------------


async def abort_connections(
    transports: Iterable[asyncio.Transport | None],
    connected: Callable[[], int],
    all_closed: asyncio.Event,
) -> int:
    """Abort every connection (an RST: no TIME_WAIT pile-up between measurements) and wait up to
    10 s for the last ``connection_lost``, which sets ``all_closed``; how many are still open."""
    all_closed.clear()
    for transport in transports:
        if transport is not None:
            transport.abort()
    if connected() > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await all_closed.wait()
    return connected()


class ProtocolError(Exception):
    pass


class Response:
    __slots__ = ("body", "close", "head", "lower", "status")

    def __init__(self, status: int, head: bytes, lower: bytes, body: bytes, close: bool) -> None:
        self.status = status
        self.head = head
        self.lower = lower
        self.body = body
        self.close = close


class ResponseReader:
    """Splits a byte stream into HTTP/1.1 responses (Content-Length bodies, or none)."""

    __slots__ = ("_buf", "_head", "_lower", "_need", "_status")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head = b""
        self._lower = b""
        self._status = 0
        self._need = -1  # body bytes still to come, -1 while reading a head

    def feed(self, data: bytes) -> list[Response]:
        self._buf += data
        out: list[Response] = []
        while True:
            if self._need < 0:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return out
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                lower = head.lower()
                if b"\r\ntransfer-encoding:" in lower:
                    raise ProtocolError("chunked answers are not expected here")
                self._head, self._lower = head, lower
                self._status = int(head[9:12])
                at = lower.find(b"\r\ncontent-length:")
                if at < 0:
                    self._need = 0
                else:
                    stop = lower.find(b"\r\n", at + 2)
                    self._need = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            if len(self._buf) < self._need:
                return out
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            lower = self._lower
            close = b"\r\nconnection: close" in lower or lower.startswith(b"http/1.0")
            out.append(Response(self._status, self._head, lower, body, close))
            self._need = -1


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; subclasses say what to send and what to do with answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader()
        # The server said "Connection: close" (the seed's dev server does after every answer):
        # send nothing more here, open a new connection instead.
        self.server_closes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.reader = ResponseReader()
        self.server_closes = False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.reader.feed(data)
        except (ProtocolError, ValueError):
            self.on_error("protocol")
            if self.transport is not None:
                self.transport.abort()
            return
        for response in responses:
            if response.close:
                self.server_closes = True
            self.on_response(response)
            if response.close and self.transport is not None:
                self.transport.close()
                return

    def on_response(self, response: Response) -> None:
        raise NotImplementedError

    def on_error(self, kind: str) -> None:
        raise NotImplementedError


# --- the poll worker --------------------------------------------------------------------------


@dataclass
class OpenSpec:
    host: str
    port: int
    dialect: str
    tasks: list[str]  # every task of the phase; a connection names one by index
    task_of: list[int]  # per connection of this worker: its task index
    hold: int = 55  # seconds a poll asks to be held
    connect_concurrency: int = 64


class Poll(HttpConn):
    def __init__(self, worker: PollWorker, index: int, task_index: int) -> None:
        super().__init__()
        self.worker = worker
        self.index = index
        self.task_index = task_index
        self.task = worker.tasks[task_index]
        self.state: PollState = NO_STATE
        self.held = False  # a request with a known state is out: the server holds it
        self.reconnects = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.worker.connected += 1
        self.send()

    def send(self) -> None:
        if self.transport is None or self.transport.is_closing() or self.server_closes:
            return  # connection_made sends on the next connection
        worker = self.worker
        if self.state[0] >= 0 and not self.held:
            self.held = True
            worker.waiting += 1
        self.transport.write(worker.dialect.poll_request(self.task, self.state, worker.hold))

    def on_response(self, response: Response) -> None:
        worker = self.worker
        now = time.monotonic()
        if self.held:
            self.held = False
            worker.waiting -= 1
        worker.responses += 1
        status = response.status
        if status == 200:
            before = self.state[0]
            self.state = worker.dialect.next_state(response.head, response.lower, response.body)
            version = self.state[0]
            worker.rec_task.append(self.task_index)
            worker.rec_version.append(version)
            worker.rec_time.append(now)
            if self.task_index == worker.expect_task and version >= worker.expect_version > before:
                worker.reached += 1
            self.send()  # at once, as the page does
        elif status in worker.dialect.again:
            self.send()
        else:
            worker.errors[f"http_{status}"] += 1
            asyncio.get_running_loop().call_later(RETRY_DELAY, self.send)

    def on_error(self, kind: str) -> None:
        self.worker.errors[kind] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        worker.connected -= 1
        if self.held:
            self.held = False
            worker.waiting -= 1
        self.transport = None
        if worker.closing:
            if worker.connected == 0:
                worker.all_closed.set()
            return
        if self.server_closes:  # a new connection per poll, as a browser does with such a server
            worker.reopened += 1
            worker.spawn(worker.reopen(self))
            return
        worker.errors["dropped"] += 1
        if self.reconnects < MAX_RECONNECTS:
            self.reconnects += 1
            worker.spawn(worker.reconnect(self))


class PollWorker:
    """The state of one poll worker process; commands come from the coordinator's pipe."""

    def __init__(self) -> None:
        self.dialect: Dialect = DIALECTS["tasks"]
        self.host, self.port, self.hold = "127.0.0.1", 0, 55
        self.tasks: list[str] = []
        self.conns: list[Poll] = []
        self.connected = 0
        self.waiting = 0
        self.responses = 0
        self.reopened = 0  # new connections after the server closed one after its answer
        self.errors: Counter[str] = Counter()
        self.closing = False
        self.all_closed = asyncio.Event()  # set when the last connection closed while closing
        self.expect_task = -1
        self.expect_version = 0
        self.reached = 0
        self.rec_task = array("i")
        self.rec_version = array("q")
        self.rec_time = array("d")
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def connect(self, conn: Poll) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: conn, self.host, self.port)
            return True
        except (OSError, TimeoutError) as exc:
            self.errors[f"connect_{type(exc).__name__}"] += 1
            return False

    async def reconnect(self, conn: Poll) -> None:
        await asyncio.sleep(0.05 * conn.reconnects)
        if not self.closing:
            await self.connect(conn)

    async def reopen(self, conn: Poll) -> None:
        """A new connection for the next poll, after the server closed the last one."""
        for attempt in range(5):
            if self.closing or await self.connect(conn):
                return
            await asyncio.sleep(0.1 * (attempt + 1))
        self.errors["lost"] += 1  # this poll is gone for the rest of the phase

    async def open(self, spec: OpenSpec) -> dict[str, Any]:
        self.dialect = DIALECTS[spec.dialect]
        self.host, self.port, self.hold = spec.host, spec.port, spec.hold
        self.tasks = spec.tasks
        self.closing = False
        self.errors.clear()
        start = len(self.conns)
        new = [Poll(self, start + i, t) for i, t in enumerate(spec.task_of)]
        self.conns.extend(new)
        gate = asyncio.Semaphore(spec.connect_concurrency)

        async def one(conn: Poll) -> bool:
            async with gate:
                for attempt in range(3):
                    if await self.connect(conn):
                        return True
                    await asyncio.sleep(0.2 * (attempt + 1))
                return False

        results = await asyncio.gather(*(one(c) for c in new))
        return {"opened": sum(results), "failed": len(results) - sum(results)}

    async def close(self) -> dict[str, Any]:
        self.closing = True
        left = await abort_connections(
            (conn.transport for conn in self.conns), lambda: self.connected, self.all_closed
        )
        self.conns.clear()
        self.connected = self.waiting = 0
        for task in list(self._tasks):
            task.cancel()
        return {"left_open": left}

    def expect(self, task_index: int, version: int) -> int:
        """Count from now on the polls of ``task_index`` that reach ``version``."""
        self.expect_task, self.expect_version = task_index, version
        self.reached = sum(
            1 for c in self.conns if c.task_index == task_index and c.state[0] >= version
        )
        return self.reached

    def status(self) -> dict[str, Any]:
        return {
            "polls": len(self.conns),
            "connected": self.connected,
            "waiting": self.waiting,
            "reached": self.reached,
            "responses": self.responses,
            "reopened": self.reopened,
            "errors": dict(self.errors),
            "cpu": time.process_time(),
        }

    def collect(self) -> dict[str, Any]:
        out = {"task": self.rec_task, "version": self.rec_version, "time": self.rec_time}
        self.rec_task, self.rec_version, self.rec_time = array("i"), array("q"), array("d")
        return out

    def last_versions(self) -> list[tuple[int, int]]:
        return [(c.task_index, c.state[0]) for c in self.conns]


# --- the writer -------------------------------------------------------------------------------


@dataclass
class WriteSpec:
    host: str
    port: int
    dialect: str
    tasks: list[str]
    versions: list[int]  # the version each task is at now (Nchan's bodies carry the next one)
    concurrency: int = 8
    duration: float = 5.0
    max_writes: int = 1_000_000
    rate: float | None = None  # None: every connection writes again as soon as it is answered
    seed: int = 7


@dataclass
class WriteLog:
    task: array[int] = field(default_factory=lambda: array("i"))
    version: array[int] = field(default_factory=lambda: array("q"))
    sent: array[float] = field(default_factory=lambda: array("d"))
    acked: array[float] = field(default_factory=lambda: array("d"))
    status: array[int] = field(default_factory=lambda: array("i"))


class Write(HttpConn):
    def __init__(self, run: WriteRun) -> None:
        super().__init__()
        self.run = run
        self.busy = False
        self.pending: tuple[int, int, float] = (0, 0, 0.0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.run.idle.append(self)
        self.run.kick()

    def write(self, task_index: int) -> None:
        run = self.run
        version = run.versions[task_index] + 1
        run.versions[task_index] = version  # Nchan's next message; the service answers its own
        run.steps += 1
        self.busy = True
        self.pending = (task_index, version, time.monotonic())
        assert self.transport is not None
        self.transport.write(run.dialect.write_request(run.tasks[task_index], version, run.steps))

    def on_response(self, response: Response) -> None:
        now = time.monotonic()
        run, (task_index, version, sent) = self.run, self.pending
        self.busy = False
        produced = run.dialect.write_result(response.status, response.body, version)
        if produced > run.versions[task_index]:
            run.versions[task_index] = produced
        log = run.log
        log.task.append(task_index)
        log.version.append(produced)
        log.sent.append(sent)
        log.acked.append(now)
        log.status.append(response.status)
        run.answered.set()
        if not self.server_closes:
            run.idle.append(self)
            run.kick()

    def on_error(self, kind: str) -> None:
        self.run.errors[kind] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        run = self.run
        if self in run.idle:
            run.idle.remove(self)
        if run.done.done():
            return
        if self.server_closes and not self.busy:
            run.reopen(self)  # back in the idle list once connected
        else:
            run.errors["dropped"] += 1


class WriteRun:
    """Closed loop (write again on each answer) or an offered rate, for ``duration`` seconds."""

    def __init__(self, spec: WriteSpec) -> None:
        self.spec = spec
        self.dialect = DIALECTS[spec.dialect]
        self.tasks = spec.tasks
        self.versions = list(spec.versions)
        self.log = WriteLog()
        self.errors: Counter[str] = Counter()
        self.idle: list[Write] = []
        self.steps = 0
        self.sent = 0
        self.offered = 0
        self.random = random.Random(spec.seed)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stopped = asyncio.Event()
        self.answered = asyncio.Event()  # set on every answer
        self.deadline = 0.0
        self._reopening: set[asyncio.Task[None]] = set()

    def reopen(self, conn: Write) -> None:
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: conn, self.spec.host, self.spec.port)
            except OSError:
                self.errors["connect"] += 1

        task = loop.create_task(connect())
        self._reopening.add(task)
        task.add_done_callback(self._reopening.discard)

    def pick(self) -> int:
        n = len(self.tasks)
        return 0 if n == 1 else self.random.randrange(n)

    def kick(self) -> None:
        """Closed loop: every idle connection writes again, until the deadline or the count."""
        if self.spec.rate is not None:
            return
        while self.idle and self.more():
            self.idle.pop().write(self.pick())
            self.sent += 1

    def more(self) -> bool:
        return time.monotonic() < self.deadline and self.sent < self.spec.max_writes

    def stop(self) -> None:
        self.deadline = min(self.deadline, time.monotonic())
        self.stopped.set()

    async def _ticker(self, start: float, interval: float) -> None:
        """Call ``tick`` every ``interval`` s from ``start`` on, until stopped."""
        at = start
        while not self.stopped.is_set():
            self.tick()
            at += interval
            await asyncio.sleep(max(0.0, at - time.monotonic()))

    def tick(self) -> None:
        """Offered rate: one write per tick when a connection is free (a busy target drops it)."""
        if not self.more():
            return
        self.offered += 1
        if self.idle:
            self.idle.pop().write(self.pick())
            self.sent += 1

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        conns = [Write(self) for _ in range(self.spec.concurrency)]
        for conn in conns:
            await loop.create_connection(lambda c=conn: c, self.spec.host, self.spec.port)  # type: ignore[misc]
        cpu0, start = time.process_time(), time.monotonic()
        self.deadline = start + self.spec.duration
        timer = loop.call_later(self.spec.duration, self.stop)
        if self.spec.rate is None:
            self.kick()
        else:
            ticker = loop.create_task(self._ticker(start, 1.0 / self.spec.rate))
        await self.stopped.wait()
        timer.cancel()
        end = time.monotonic()
        with contextlib.suppress(TimeoutError):  # let the writes in flight be answered
            async with asyncio.timeout(10):
                while any(c.busy for c in conns):
                    self.answered.clear()
                    await self.answered.wait()
        if self.spec.rate is not None:
            ticker.cancel()
        self.done.set_result(None)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        return {
            "log": self.log,
            "start": start,
            "end": end,
            "sent": self.sent,
            "offered": self.offered,
            "versions": self.versions,
            "errors": dict(self.errors),
            "cpu": time.process_time() - cpu0,
        }


# --- the worker process -----------------------------------------------------------------------


def run_worker(
    serve: Callable[[Connection], Coroutine[Any, Any, None]], pipe: Connection, loop: str
) -> None:
    """A load process's main (here and in ``transports.py``): the open-file limit raised, the
    cyclic GC off (the clients make no cycles: the client is not the pause it measures), then
    ``serve(pipe)`` on ``loop``."""
    raise_nofile_limit()
    gc.disable()
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(pipe))
    else:
        asyncio.run(serve(pipe))


def worker_main(pipe: Connection, loop: str) -> None:
    run_worker(_serve, pipe, loop)


def start_workers(
    count: int, target: Callable[[Connection, str], None], loop: str, name: str
) -> tuple[list[Connection], list[multiprocessing.process.BaseProcess]]:
    """``count`` fresh worker processes running ``target(pipe, loop)``; their pipes and
    processes (here and in ``transports.py``)."""
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    processes: list[multiprocessing.process.BaseProcess] = []
    for n in range(count):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, loop), name=f"{name}-{n}", daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        processes.append(proc)
    return pipes, processes


def stop_workers(
    pipes: Sequence[Connection],
    processes: Sequence[multiprocessing.process.BaseProcess],
    exit_message: tuple[Any, ...],
) -> None:
    """Ask each worker to exit, then wait for it (killed if it has not within 5 s)."""
    for pipe in pipes:
        with contextlib.suppress(OSError):
            pipe.send(exit_message)
    for proc in processes:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


async def _serve(pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    worker = PollWorker()
    writes: list[WriteRun] = []
    stop: asyncio.Future[None] = loop.create_future()

    async def handle(command: str, arg: Any) -> Any:
        if command == "open":
            return await worker.open(arg)
        if command == "close":
            return await worker.close()
        if command == "status":
            return worker.status()
        if command == "expect":
            return worker.expect(*arg)
        if command == "collect":
            return worker.collect()
        if command == "last_versions":
            return worker.last_versions()
        if command == "write":
            run = WriteRun(arg)
            writes.append(run)
            try:
                return await run.run()
            finally:
                writes.remove(run)
        if command == "write_stop":
            for run in writes:
                run.stop()
            return len(writes)
        if command == "limits":
            return {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "pid": os.getpid()}
        if command == "exit":
            stop.set_result(None)
            return None
        raise ValueError(f"unknown command {command}")

    async def run(ident: int, command: str, arg: Any) -> None:
        try:
            reply: Any = (ident, "ok", await handle(command, arg))
        except Exception as exc:  # reported to the coordinator, which raises it
            reply = (ident, "error", f"{type(exc).__name__}: {exc}")
        pipe.send(reply)

    def readable() -> None:
        while pipe.poll():
            ident, command, arg = pipe.recv()
            worker.spawn(run(ident, command, arg))

    loop.add_reader(pipe.fileno(), readable)
    os.set_blocking(pipe.fileno(), True)  # libuv made it non-blocking: a long reply must not tear
    await stop
    loop.remove_reader(pipe.fileno())


# --- the coordinator's side -------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class LoadClient:
    """``workers`` poll processes and one writer process, driven over pipes."""

    def __init__(self, workers: int, loop: str = "uvloop") -> None:
        self.loop = loop
        self.pipes, self.processes = start_workers(workers + 1, worker_main, loop, "bench-load")
        self.pollers = self.pipes[:-1]
        self.writer = self.pipes[-1]
        self._ident = 0
        self._replies: dict[tuple[Connection, int], tuple[str, Any]] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def _send(self, pipe: Connection, command: str, arg: Any) -> int:
        self._ident += 1
        pipe.send((self._ident, command, arg))
        return self._ident

    def _reply(self, pipe: Connection, ident: int, command: str, deadline: float) -> Any:
        """The reply to request ``ident``; replies to other requests are kept for later."""
        while (pipe, ident) not in self._replies:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerError(f"load worker gave no answer to {command} in time")
            got, kind, value = pipe.recv()
            self._replies[(pipe, got)] = (kind, value)
        kind, value = self._replies.pop((pipe, ident))
        if kind == "error":
            raise WorkerError(f"load worker failed on {command}: {value}")
        return value

    def _call(
        self, pipes: Sequence[Connection], command: str, args: Sequence[Any], timeout: float
    ) -> list[Any]:
        idents = [self._send(pipe, command, arg) for pipe, arg in zip(pipes, args, strict=True)]
        deadline = time.monotonic() + timeout
        return [
            self._reply(pipe, ident, command, deadline)
            for pipe, ident in zip(pipes, idents, strict=True)
        ]

    def broadcast(self, command: str, arg: Any = None, timeout: float = 30.0) -> list[Any]:
        return self._call(self.pollers, command, [arg] * len(self.pollers), timeout)

    def limits(self) -> list[Any]:
        return self._call(self.pipes, "limits", [None] * len(self.pipes), 10)

    def open(
        self,
        host: str,
        port: int,
        dialect: str,
        tasks: list[str],
        task_of: Sequence[int],
        *,
        timeout: float = 120.0,
        connect_concurrency: int = 64,
    ) -> dict[str, int]:
        """Open one poll per entry of ``task_of``, spread over the workers; opened/failed counts."""
        n = len(self.pollers)
        specs = [
            OpenSpec(
                host,
                port,
                dialect,
                tasks,
                list(task_of[i::n]),
                connect_concurrency=connect_concurrency,
            )
            for i in range(n)
        ]
        replies = self._call(self.pollers, "open", specs, timeout)
        return {k: sum(r[k] for r in replies) for k in ("opened", "failed")}

    def close(self) -> int:
        return sum(r["left_open"] for r in self.broadcast("close", timeout=30))

    def status(self) -> dict[str, Any]:
        replies = self.broadcast("status", timeout=10)
        errors: Counter[str] = Counter()
        for r in replies:
            errors.update(r["errors"])
        keys = ("polls", "connected", "waiting", "reached", "responses", "reopened")
        total = {k: sum(r[k] for r in replies) for k in keys}
        return {**total, "errors": dict(errors), "cpu": [r["cpu"] for r in replies]}

    def expect(self, task_index: int, version: int) -> int:
        return sum(self.broadcast("expect", (task_index, version)))

    def collect(self) -> tuple[array[int], array[int], array[float]]:
        tasks, versions, times = array("i"), array("q"), array("d")
        for r in self.broadcast("collect", timeout=30):
            tasks.extend(r["task"])
            versions.extend(r["version"])
            times.extend(r["time"])
        return tasks, versions, times

    def last_versions(self) -> list[tuple[int, int]]:
        return [pair for r in self.broadcast("last_versions") for pair in r]

    def write(self, spec: WriteSpec) -> dict[str, Any]:
        """Run writes as ``spec`` says, in the writer process; its log and counts."""
        return self.write_result(self.write_start(spec), spec)

    def write_start(self, spec: WriteSpec) -> int:
        """Start writes in the writer process and return at once; ``write_result`` ends them."""
        return self._send(self.writer, "write", spec)

    def write_result(self, ident: int, spec: WriteSpec, stop: bool = False) -> dict[str, Any]:
        if stop:
            self._reply(self.writer, self._send(self.writer, "write_stop", None), "write_stop",
                        time.monotonic() + 10)  # fmt: skip
        result: dict[str, Any] = self._reply(
            self.writer, ident, "write", time.monotonic() + spec.duration + 60
        )
        return result

    def wait(
        self, check: Callable[[dict[str, Any]], bool], timeout: float, interval: float = 0.02
    ) -> tuple[bool, dict[str, Any]]:
        """Poll the workers' status until ``check`` holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if check(status):
                return True, status
            if time.monotonic() > deadline:
                return False, status
            time.sleep(interval)

    def shutdown(self) -> None:
        stop_workers(self.pipes, self.processes, (0, "exit", None))


# --- a blocking client for the coordinator's own writes ---------------------------------------


class SyncHttp:
    """One keep-alive connection for single requests whose timing the coordinator takes itself."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.addr = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, raw: bytes) -> Response:
        for attempt in (1, 2):
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(raw)
                reader = ResponseReader()
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        raise ConnectionResetError("closed by the server")
                    responses = reader.feed(data)
                    if responses:
                        if responses[0].close:
                            self.close()
                        return responses[0]
            except OSError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
