"""Transport comparison: long polling, Server-Sent Events and WebSocket on the same target.

For each transport, on a freshly started target: N clients follow one task, then the coordinator
writes it ``updates`` times, ``interval`` apart, and measures

- server CPU per delivered notification: every process of the target (instances, nginx, Redis)
  from the first write until every client has the last version (and, for long polling, has asked
  again), divided by the deliveries;
- bytes on the wire per delivered update: what each client's socket sent and received in that
  window (TCP payload: HTTP heads and bodies, chunk framing, WebSocket frame headers; not TCP/IP
  headers or ACKs), divided by the deliveries, in each direction;
- the delivery delay of each client, from the moment the write was sent;
- memory per connected client: PSS growth of the instances from before the clients connect until
  every one is held (``scenarios.memory`` and ``scenarios.per_waiter_kib``).

The clients are raw ``asyncio.Protocol`` connections in worker processes, as in ``load.py``, so the
byte counts are what the socket carried and a client costs a few bytes operations per message.
They send only the headers the protocol needs (a browser adds a few hundred bytes of its own to
every long poll, once to a stream). A long poll asks again the moment its answer arrives; an SSE
client parses ``id:``/``data:`` events out of the chunked answer; a WebSocket client does the
handshake, sends masked text frames, reads the server's unmasked ones and answers pings; ``ws``
offers no extension, ``ws-deflate`` offers permessage-deflate as browsers do and inflates what it
gets if the server accepts (aiohttp does by default; this service declines it). A client that
drops is counted as an error, never reconnected: each measurement is bounded in clients, updates
and time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

from .dialects import DIALECTS, HOST_HEADER, body_version
from .load import (
    ProtocolError,
    ResponseReader,
    WorkerError,
    abort_connections,
    run_worker,
    start_workers,
    stop_workers,
)
from .scenarios import (
    Emit,
    Writer,
    busy_seconds,
    cpu_seconds,
    create_task,
    diff,
    memory,
    per_waiter_kib,
    server_waiting,
    summary_ms,
)
from .targets import running

TRANSPORTS = ("longpoll", "sse", "ws", "ws-deflate")
TARGETS = ("service-1", "service-3")  # the others speak long polling only
TASK = "fan"
HOLD = 55  # seconds a long poll asks to be held
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class TransportSettings:
    clients: int = 1_000
    updates: int = 20
    interval: float = 0.2  # seconds between two writes
    workers: int = 2  # client processes
    connect_timeout: float = 60.0  # for every client to be connected and followed
    settle_timeout: float = 20.0  # after the last write, for every client to have it
    idle_seconds: float = 1.0  # the target's own CPU with every client connected and no write


# --- the clients ------------------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One connection; counts the bytes both ways and records each new version it is told."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.version = worker.version
        self.transport: asyncio.Transport | None = None
        self.ready = False  # following the task: a poll out, a stream open, a subscription live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.worker.connected += 1
        self.start()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.worker.bytes_out += len(data)
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.worker.bytes_in += len(data)
        try:
            self.feed(data)
        except (ProtocolError, ValueError) as exc:
            self.fail(f"protocol: {exc}"[:80])

    def fail(self, kind: str) -> None:
        self.worker.errors[kind] += 1
        if self.transport is not None:
            self.transport.abort()

    def set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self.worker.ready += 1 if ready else -1

    def delivered(self, version: int) -> None:
        if version > self.version:
            self.version = version
            self.worker.rec_version.append(version)
            self.worker.rec_time.append(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        worker.connected -= 1
        self.set_ready(False)
        self.transport = None
        if worker.closing:
            if worker.connected == 0:
                worker.all_closed.set()
        else:
            worker.errors["dropped"] += 1

    def start(self) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        raise NotImplementedError


class LongPoll(Client):
    """``GET /api/tasks/{id}/poll?since=V``, again as soon as the answer arrives."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.reader = ResponseReader()

    def start(self) -> None:
        self.ask()

    def ask(self) -> None:
        self.send(DIALECTS["tasks"].poll_request(self.worker.task, (self.version, b""), HOLD))
        self.set_ready(True)

    def feed(self, data: bytes) -> None:
        for response in self.reader.feed(data):
            self.set_ready(False)
            if response.status == 200:
                self.delivered(body_version(response.body))
            elif response.status != 204:
                self.fail(f"http_{response.status}")
                return
            if response.close:
                self.fail("closed")
                return
            self.ask()


class EventStream(Client):
    """``GET /api/tasks/{id}/events?since=V``: one answer, chunked, of ``id:``/``data:`` events."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.head: bytes | None = None
        self.chunked = False
        self.raw = bytearray()  # as received, after the head
        self.text = bytearray()  # the event stream, de-chunked
        self.need = 0  # bytes of the current chunk still to come
        self.skip = 0  # the CRLF after a chunk

    def start(self) -> None:
        self.send(
            f"GET /api/tasks/{self.worker.task}/events?since={self.version} HTTP/1.1\r\n".encode()
            + HOST_HEADER
            + b"Accept: text/event-stream\r\n\r\n"
        )

    def feed(self, data: bytes) -> None:
        if self.head is None:
            self.raw += data
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.raw[:end]).lower()
            del self.raw[: end + 4]
            if not self.head.startswith(b"http/1.1 200"):
                raise ProtocolError(self.head[:12].decode(errors="replace"))
            self.chunked = b"\r\ntransfer-encoding: chunked" in self.head
            self.set_ready(True)
            data = b""
        if self.chunked:
            self.raw += data
            self.dechunk()
        else:
            self.text += self.raw + data
            self.raw.clear()
        while (end := self.text.find(b"\n\n")) >= 0:
            event = bytes(self.text[:end])
            del self.text[: end + 2]
            if b"data:" in event:
                self.delivered(body_version(event))

    def dechunk(self) -> None:
        raw = self.raw
        while True:
            if self.skip:
                if len(raw) < self.skip:
                    return
                del raw[: self.skip]
                self.skip = 0
            if self.need == 0:
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(raw[:end]).split(b";")[0], 16)
                del raw[: end + 2]
                if size == 0:
                    raise ProtocolError("the stream ended")
                self.need = size
            take = min(self.need, len(raw))
            if take == 0:
                return
            self.text += raw[:take]
            del raw[:take]
            self.need -= take
            if self.need == 0:
                self.skip = 2


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN, masked) of at most 125 bytes: every one this client sends."""
    if len(payload) > 125:
        raise ValueError("client frames are short here")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


class WebSocket(Client):
    """``GET /api/ws``, then ``{"subscribe": {"task": T, "version": V}}`` after the hello."""

    OFFER = b""  # extensions offered in the handshake

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.key = base64.b64encode(os.urandom(16))
        self.upgraded = False
        self.inflater: Any = None  # permessage-deflate: one context for the connection
        self.buf = bytearray()
        self.message = bytearray()  # a fragmented message so far
        self.compressed = False  # the message so far came with RSV1 (deflated)

    def start(self) -> None:
        self.send(
            b"GET /api/ws HTTP/1.1\r\n"
            + HOST_HEADER
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            + self.OFFER
            + b"Sec-WebSocket-Key: "
            + self.key
            + b"\r\n\r\n"
        )

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest()).lower()
            if not head.startswith(b"http/1.1 101") or accept not in head:
                raise ProtocolError(head[:12].decode(errors="replace"))
            if b"permessage-deflate" in head:
                self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            # else declined (the service does since 0c49da8): plain frames, as ``ws``
            self.upgraded = True
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            rsv1 = first & 0x40 and self.inflater is not None
            if second & 0x80 or first & (0x30 if rsv1 else 0x70):
                raise ProtocolError("a masked server frame, or an extension we did not offer")
            length, at = second & 0x7F, 2
            if length >= 126:
                at = 4 if length == 126 else 10
                if len(buf) < at:
                    return
                length = int.from_bytes(buf[2:at])
            if len(buf) < at + length:
                return
            payload = bytes(buf[at : at + length])
            del buf[: at + length]
            opcode = first & 0x0F
            if opcode in (0, 1, 2):
                if opcode:
                    self.compressed = bool(rsv1)  # said on a message's first frame
                self.message += payload
                if first & 0x80:
                    message = bytes(self.message)
                    self.message.clear()
                    if self.compressed:
                        message = self.inflater.decompress(message + b"\x00\x00\xff\xff")
                    self.on_message(message)
            elif opcode == 9:  # ping: aiohttp's heartbeat drops a client that does not answer
                self.send(ws_frame(0xA, payload))
            elif opcode == 8:
                self.send(ws_frame(0x8, payload[:2]))
                raise ProtocolError("closed by the server")

    def on_message(self, message: bytes) -> None:
        if message.startswith(b'{"state"'):
            self.delivered(body_version(message))
        elif message.startswith(b'{"hello"'):
            subscribe = {"subscribe": {"task": self.worker.task, "version": self.version}}
            self.send(ws_frame(0x1, json.dumps(subscribe).encode()))
        elif message.startswith(b'{"subscribed"'):
            self.set_ready(True)
        elif message.startswith(b'{"error"'):
            self.worker.errors["ws_error"] += 1


class WebSocketDeflate(WebSocket):
    """Offers permessage-deflate, as browsers do (aiohttp accepts it by default)."""

    OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


CLIENTS: dict[str, type[Client]] = {
    "longpoll": LongPoll,
    "sse": EventStream,
    "ws": WebSocket,
    "ws-deflate": WebSocketDeflate,
}


# --- the worker process -----------------------------------------------------------------------


@dataclass
class OpenSpec:
    host: str
    port: int
    transport: str
    task: str
    version: int  # what every client has: it is told only of later ones
    count: int
    concurrency: int = 64


class Worker:
    """The clients of one process and their counts; commands come over the coordinator's pipe."""

    def __init__(self) -> None:
        self.task = TASK
        self.version = 0
        self.clients: list[Client] = []
        self.connected = 0
        self.ready = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors: Counter[str] = Counter()
        self.rec_version = array("q")
        self.rec_time = array("d")
        self.closing = False
        self.all_closed = asyncio.Event()

    async def open(self, spec: OpenSpec) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        self.task, self.version, self.closing = spec.task, spec.version, False
        make = CLIENTS[spec.transport]
        gate = asyncio.Semaphore(spec.concurrency)

        async def one() -> bool:
            client = make(self)
            async with gate:
                try:
                    async with asyncio.timeout(10):
                        await loop.create_connection(lambda: client, spec.host, spec.port)
                except (OSError, TimeoutError) as exc:
                    self.errors[f"connect_{type(exc).__name__}"] += 1
                    return False
            self.clients.append(client)
            return True

        results = await asyncio.gather(*(one() for _ in range(spec.count)))
        return {"opened": sum(results), "failed": len(results) - sum(results)}

    def status(self, version: int) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "connected": self.connected,
            "ready": self.ready,
            "reached": sum(1 for c in self.clients if c.version >= version),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": dict(self.errors),
            "cpu": time.process_time(),
        }

    def reset(self) -> None:
        """Count bytes and deliveries from now on."""
        self.bytes_in = self.bytes_out = 0
        self.rec_version, self.rec_time = array("q"), array("d")

    def collect(self) -> dict[str, Any]:
        return {"version": self.rec_version, "time": self.rec_time}

    async def close(self) -> dict[str, int]:
        self.closing = True
        left = await abort_connections(
            (client.transport for client in self.clients), lambda: self.connected, self.all_closed
        )
        self.clients.clear()
        self.connected = self.ready = 0
        self.errors.clear()
        self.reset()
        return {"left_open": left}


def worker_main(pipe: Connection, loop: str) -> None:
    run_worker(_serve, pipe, loop)


async def _serve(pipe: Connection) -> None:
    """One command at a time: read it, run it, send the reply."""
    loop = asyncio.get_running_loop()
    worker = Worker()
    commands: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def readable() -> None:
        while pipe.poll():
            commands.put_nowait(pipe.recv())

    loop.add_reader(pipe.fileno(), readable)
    os.set_blocking(pipe.fileno(), True)  # libuv made it non-blocking: a long reply must not tear
    while True:
        command, arg = await commands.get()
        try:
            if command == "exit":
                break
            if command == "open":
                reply: Any = await worker.open(arg)
            elif command == "status":
                reply = worker.status(arg)
            elif command == "reset":
                worker.reset()
                reply = None
            elif command == "collect":
                reply = worker.collect()
            elif command == "close":
                reply = await worker.close()
            else:
                raise ValueError(f"unknown command {command}")
            pipe.send(("ok", reply))
        except Exception as exc:  # reported to the coordinator, which raises it
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    loop.remove_reader(pipe.fileno())


class TransportClient:
    """``workers`` client processes, driven over pipes, one command at a time."""

    def __init__(self, workers: int, loop: str = "uvloop") -> None:
        self.pipes, self.processes = start_workers(workers, worker_main, loop, "bench-transport")

    def call(self, command: str, args: list[Any], timeout: float = 10.0) -> list[Any]:
        for pipe, arg in zip(self.pipes, args, strict=True):
            pipe.send((command, arg))
        deadline = time.monotonic() + timeout
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerError(f"transport worker gave no answer to {command} in time")
            kind, value = pipe.recv()
            if kind == "error":
                raise WorkerError(f"transport worker failed on {command}: {value}")
            replies.append(value)
        return replies

    def broadcast(self, command: str, arg: Any = None, timeout: float = 10.0) -> list[Any]:
        return self.call(command, [arg] * len(self.pipes), timeout)

    def open(self, port: int, transport: str, version: int, n: int, timeout: float) -> int:
        w = len(self.pipes)
        specs = [
            OpenSpec("127.0.0.1", port, transport, TASK, version, n // w + (i < n % w))
            for i in range(w)
        ]
        return sum(r["opened"] for r in self.call("open", specs, timeout))

    def status(self, version: int = 0) -> dict[str, Any]:
        replies = self.broadcast("status", version)
        errors: Counter[str] = Counter()
        for r in replies:
            errors.update(r["errors"])
        keys = ("clients", "connected", "ready", "reached", "bytes_in", "bytes_out")
        total = {k: sum(r[k] for r in replies) for k in keys}
        return {**total, "errors": dict(errors), "cpu": [r["cpu"] for r in replies]}

    def wait(
        self, check: Callable[[dict[str, Any]], bool], timeout: float, version: int = 0
    ) -> tuple[bool, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(version)
            if check(status) or time.monotonic() > deadline:
                return check(status), status
            time.sleep(0.02)

    def collect(self) -> tuple[array[int], array[float]]:
        versions, times = array("q"), array("d")
        for r in self.broadcast("collect", timeout=30):
            versions.extend(r["version"])
            times.extend(r["time"])
        return versions, times

    def close(self) -> int:
        return sum(r["left_open"] for r in self.broadcast("close", timeout=30))

    def shutdown(self) -> None:
        stop_workers(self.pipes, self.processes, ("exit", None))


# --- the measurement --------------------------------------------------------------------------


def measure(
    client: TransportClient,
    key: str,
    transport: str,
    settings: TransportSettings,
    workdir: Path,
    emit: Emit,
) -> None:
    """One transport against a freshly started target; one ``transport`` record."""
    n = settings.clients
    with running(key, workdir) as target:
        writer = Writer(target, TASK, create_task(target, TASK))
        try:
            pids = target.pids()
            mem0 = memory(pids)
            t_open = time.monotonic()
            opened = client.open(
                target.port, transport, writer.version, n, settings.connect_timeout
            )
            ready_ok, status = client.wait(lambda s: s["ready"] >= n, settings.connect_timeout)
            deadline = time.monotonic() + settings.connect_timeout
            while server_waiting(target) < status["ready"] and time.monotonic() < deadline:
                time.sleep(0.02)
            open_seconds = time.monotonic() - t_open
            by_role = target.waiting_by_role()
            held = sum(by_role.values())
            mem1 = memory(pids)
            idle0, t_idle = cpu_seconds(pids), time.monotonic()
            time.sleep(settings.idle_seconds)
            idle_cores = sum(diff(cpu_seconds(pids), idle0).values()) / (time.monotonic() - t_idle)

            following = status["ready"]
            client.broadcast("reset")
            ccpu0, cpu0, all0 = client.status()["cpu"], cpu_seconds(pids), busy_seconds()
            sent: dict[int, float] = {}
            start = time.monotonic()
            for i in range(settings.updates):
                time.sleep(max(0.0, start + i * settings.interval - time.monotonic()))
                produced, t_sent, _ = writer.write()
                if produced > 0:
                    sent[produced] = t_sent
            final = writer.version

            def settled(s: dict[str, Any]) -> bool:
                # a long poll's cost includes the poll it sends again: count until it is out
                return bool(s["reached"] >= following and s["ready"] >= following)

            all_reached, end = client.wait(settled, settings.settle_timeout, final)
            if transport == "longpoll":
                deadline = time.monotonic() + settings.settle_timeout
                while server_waiting(target) < held and time.monotonic() < deadline:
                    time.sleep(0.01)
            seconds = time.monotonic() - start
            cpu1, all1 = cpu_seconds(pids), busy_seconds()
            ccpu1 = client.status()["cpu"]
            versions, times = client.collect()
        finally:
            client.close()
            writer.close()
    delays = [t - sent[v] for v, t in zip(versions, times, strict=True) if v in sent]
    delivered = max(1, len(delays))
    server_cpu = diff(cpu1, cpu0)
    client_cpu = [b - a for a, b in zip(ccpu0, ccpu1, strict=True)]
    kib = per_waiter_kib(mem0, mem1, by_role, held)
    growth = sum(mem1[r]["pss"] - mem0[r]["pss"] for r in mem1 if r.startswith("instance"))
    emit(
        {
            "scenario": "transport",
            "target": key,
            "transport": transport,
            "n": n,
            "opened": opened,
            "following": following,
            "held_server": held,
            "all_following": ready_ok,
            "open_seconds": open_seconds,
            "updates": len(sent),
            "interval_s": settings.interval,
            "seconds": seconds,
            "delivered": len(delays),
            "expected": len(sent) * following,
            "all_reached_last": all_reached,
            "server_cpu": server_cpu,
            "cpu_us_per_notification": 1e6 * sum(server_cpu.values()) / delivered,
            "idle_cores": idle_cores,
            "cpu_us_per_notification_less_idle": 1e6
            * max(0.0, sum(server_cpu.values()) - idle_cores * seconds)
            / delivered,
            "bytes_in": end["bytes_in"],
            "bytes_out": end["bytes_out"],
            "bytes_in_per_update": end["bytes_in"] / delivered,
            "bytes_out_per_update": end["bytes_out"] / delivered,
            "delay": summary_ms(delays),
            "memory_before": mem0,
            "memory_following": mem1,
            "kib_per_waiter": kib,
            "kib_per_client": growth / max(1, held) / 1024,
            "client_cpu_us_per_notification": 1e6 * sum(client_cpu) / delivered,
            "client_busy_max": max(client_cpu) / seconds,
            "other_cpu_share": ((all1 - all0) - sum(server_cpu.values()) - sum(client_cpu))
            / seconds,
            "errors": end["errors"],
        }
    )
