"""The engine-core process: scheduler and forward pass alone in one interpreter, fed over ZeroMQ.

The front end (HTTP, tokenizer, detokenizer, SSE) lives in another process, so none of its Python work holds
this interpreter's GIL between the forward pass's ops. Inputs (adds, aborts) are drained between steps; each
step's outputs go back as one msgpack message. The process exits when told to, or when its parent is gone.
"""
from __future__ import annotations

import logging
import os

import msgspec
import zmq

from aptserve.core.messages import AbortRequests, AddRequest, CoreInput, Shutdown

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # while idle, how often to check that the parent is still there


def run_engine_core(args, input_address: str, output_address: str, ready_pipe, log_level: int) -> None:
    """Process entry point: build the engine core from EngineArgs, report the resolved config and its first
    gauges (or the error), then serve until shut down."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine-core]: %(message)s")
    parent_pid = os.getppid()
    try:
        core = build_engine_core(args)
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


def build_engine_core(args):
    from aptserve.core.engine_core import EngineCore
    from aptserve.engine_args import resolve
    from aptserve.runner import ModelRunner

    config = resolve(args)
    return EngineCore(config, ModelRunner.from_config(config))


def _serve(core, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int) -> None:
    decoder = msgspec.msgpack.Decoder(CoreInput)
    encoder = msgspec.msgpack.Encoder()
    while True:
        timeout_ms = 0 if core.has_unfinished_requests() else IDLE_POLL_MS
        while inputs.poll(timeout_ms):
            message = decoder.decode(inputs.recv())
            if isinstance(message, Shutdown):
                return
            _apply(core, message, outputs, encoder)
            timeout_ms = 0
        if os.getppid() != parent_pid:
            logger.warning("the front end is gone; stopping")
            return
        step_outputs = core.step()
        if step_outputs is not None:
            outputs.send(encoder.encode(step_outputs))


def _apply(core, message: AddRequest | AbortRequests, outputs: zmq.Socket, encoder) -> None:
    if isinstance(message, AbortRequests):
        core.abort_requests(message.request_ids)
        if (idle := core.idle_stats()) is not None:
            outputs.send(encoder.encode(idle))
        return
    try:
        core.add_request(message.request)
    except Exception as exc:  # the front end checked it; a refusal here is reported to that request alone
        logger.exception("could not add %s", message.request.request_id)
        outputs.send(encoder.encode(core.refusal(message.request.request_id, f"{type(exc).__name__}: {exc}")))
