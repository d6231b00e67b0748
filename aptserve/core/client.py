"""How the front end reaches the engine core: in a thread of its own process, or in a process of its own.

Both take requests and aborts from the event loop without blocking it and hand each step's outputs back on the
event loop (`on_outputs`); both report a core that stopped for good (`on_death`).

- ThreadCore: an EngineCore already built (--engine-in-thread, tests, the simulator's engine) stepped by the step
  loop (loop.py) in a thread.
- ProcessCore: `aptserve serve`'s: the core is built from EngineArgs in a spawned process (core/process.py), runs
  the same step loop there and talks over ZeroMQ; the front end's Python never holds the GIL the forward pass needs.

Both take the same messages (core/messages.py), so the loop and its failure policy are one.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from aptserve.config import EngineConfig
from aptserve.core.engine_core import EngineCore
from aptserve.core.loop import EngineLoop
from aptserve.core.messages import (AbortRequests, AddRequest, CoreInput, EngineCoreOutputs, EngineCoreRequest,
                                    EngineStats, PollSnapshot, Shutdown)
from aptserve.errors import AptServeError

logger = logging.getLogger(__name__)

OnOutputs = Callable[[EngineCoreOutputs], None]
OnDeath = Callable[[str], None]


class EngineStartError(AptServeError):
    """The engine-core process could not build the engine (its error says why)."""


class ThreadCore:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.config: EngineConfig = core.config
        self._inbox: queue.SimpleQueue[CoreInput] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def initial_stats(self) -> EngineStats:
        return self.core.stats()

    def start(self, on_outputs: OnOutputs, on_death: OnDeath) -> None:
        loop = asyncio.get_running_loop()
        engine_loop = EngineLoop(self.core, lambda outputs: _call_soon(loop, on_outputs, outputs))
        self._thread = threading.Thread(target=self._run, args=(engine_loop, lambda: _call_soon(loop, on_death,
                                        "the engine loop died")), name="aptserve-engine", daemon=True)
        self._thread.start()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._inbox.put(AddRequest(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._inbox.put(AbortRequests(request_ids))

    def poll_snapshot(self) -> None:
        self._inbox.put(PollSnapshot())

    def stop(self) -> None:
        """Stop stepping after the current step (shutdown() waits for it)."""
        self._inbox.put(Shutdown())

    def shutdown(self) -> None:
        """Blocking: wait for the thread; requests still in the core are aborted (their front end fails them)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, engine_loop: EngineLoop, report_death: Callable[[], None]) -> None:
        try:
            engine_loop.run(self._receive)
        except BaseException:  # what the loop could not isolate: say so; the front end fails every waiter
            logger.exception("the engine loop died")
            report_death()

    def _receive(self, timeout_s: float) -> list[CoreInput]:
        try:
            messages = [self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages


class ProcessCore:
    def __init__(self, config: EngineConfig, stats: EngineStats, process,
                 contexts: tuple[zmq.Context, zmq.asyncio.Context], inputs: zmq.Socket, outputs: zmq.asyncio.Socket,
                 socket_dir: str) -> None:
        self.config = config
        self._initial_stats = stats
        self.process = process
        self._contexts, self._inputs, self._outputs, self._socket_dir = contexts, inputs, outputs, socket_dir
        self._encoder = msgspec.msgpack.Encoder()
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    @classmethod
    def launch(cls, args, log_level: int = logging.INFO, startup_timeout_s: float = 600.0) -> ProcessCore:
        """Spawn the engine-core process and wait until its model is loaded; raises EngineStartError."""
        from aptserve.core.process import run_engine_core

        socket_dir = tempfile.mkdtemp(prefix="aptserve-")  # short paths: ipc:// names have a length limit
        input_address, output_address = f"ipc://{socket_dir}/in", f"ipc://{socket_dir}/out"
        # Inputs on a plain socket (sent from the event loop, and at shutdown from a worker thread); outputs on
        # an asyncio one, awaited by the loop.
        contexts = (zmq.Context(), zmq.asyncio.Context())
        inputs, outputs = contexts[0].socket(zmq.PUSH), contexts[1].socket(zmq.PULL)
        inputs.bind(input_address)
        outputs.bind(output_address)
        spawn = multiprocessing.get_context("spawn")
        receive, send = spawn.Pipe(duplex=False)
        process = spawn.Process(target=run_engine_core, name="aptserve-engine-core", daemon=True,
                                args=(args, input_address, output_address, send, log_level))
        process.start()
        send.close()
        try:
            if not receive.poll(startup_timeout_s):
                raise EngineStartError(f"the engine core did not start within {startup_timeout_s:.0f} s")
            status, payload = receive.recv()
        except EOFError:
            process.join(5)
            status, payload = "error", f"the engine-core process exited with code {process.exitcode}"
        if status != "ready":
            process.kill()
            for context in contexts:
                context.destroy(linger=0)
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise EngineStartError(payload)
        config, stats = payload
        return cls(config, stats, process, contexts, inputs, outputs, socket_dir)

    def initial_stats(self) -> EngineStats:
        return self._initial_stats

    def start(self, on_outputs: OnOutputs, on_death: OnDeath) -> None:
        self._tasks = [asyncio.create_task(self._read_outputs(on_outputs)),
                       asyncio.create_task(self._watch(on_death))]

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(AddRequest(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(AbortRequests(request_ids))

    def poll_snapshot(self) -> None:
        self._send(PollSnapshot())

    def stop(self) -> None:
        """On the event loop: stop reading outputs and tell the core to stop (shutdown() waits for it)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        self._send(Shutdown())

    def shutdown(self) -> None:
        """Blocking: wait for the core to exit (kill it after 10 s) and release the sockets."""
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        for context in self._contexts:
            context.destroy(linger=0)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _send(self, message) -> None:
        if not self.process.is_alive():
            return  # its death is reported by _watch
        try:
            self._inputs.send(self._encoder.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:  # the core stopped reading: its death is reported by _watch
            logger.error("the engine core is not taking input")

    async def _read_outputs(self, on_outputs: OnOutputs) -> None:
        decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        while True:
            on_outputs(decoder.decode(await self._outputs.recv()))

    async def _watch(self, on_death: OnDeath) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.process.join)
        if not self._closing:
            on_death(f"the engine-core process exited with code {self.process.exitcode}")


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop is closed: nobody is left to tell
        pass
