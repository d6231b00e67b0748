"""The engine-core process: scheduler and forward pass alone in one interpreter, fed over ZeroMQ.

The front end (HTTP, tokenizer, detokenizer, SSE) lives in another process, so none of its Python work holds
this interpreter's GIL between the forward pass's ops. The step loop (loop.py) drains inputs (adds, aborts, polls)
between steps; each step's outputs go back as one msgpack message. The process exits when told to, when its parent
is gone, or when the loop dies (the front end then fails every open request and the server exits).
"""
from __future__ import annotations

import logging
import os

import msgspec
import zmq

from aptserve.core.engine_core import build_served_core
from aptserve.core.loop import EngineLoop
from aptserve.core.messages import CoreInput

logger = logging.getLogger(__name__)


def run_engine_core(args, input_address: str, output_address: str, ready_pipe, log_level: int) -> None:
    """Process entry point: build the engine core from EngineArgs, report the resolved config and its first
    gauges (or the error), then serve until shut down."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine-core]: %(message)s")
    parent_pid = os.getppid()
    try:
        core = build_served_core(args)
    except Exception as exc:  # the front end reports it and exits; nothing else can
        logger.debug("engine start failed", exc_info=True)
        ready_pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inputs.connect(input_address)
    outputs.connect(output_address)
    ready_pipe.send(("ready", (core.config, core.stats())))
    ready_pipe.close()
    try:
        _serve(core, inputs, outputs, parent_pid)
    finally:
        context.destroy(linger=0)


def _serve(core, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int) -> None:
    decoder = msgspec.msgpack.Decoder(CoreInput)
    encoder = msgspec.msgpack.Encoder()

    def receive(timeout_s: float) -> list[CoreInput]:
        messages, timeout_ms = [], int(timeout_s * 1000)
        while inputs.poll(timeout_ms):
            messages.append(decoder.decode(inputs.recv()))
            timeout_ms = 0
        return messages

    EngineLoop(core, lambda step_outputs: outputs.send(encoder.encode(step_outputs))).run(
        receive, keep_going=lambda: os.getppid() == parent_pid)
