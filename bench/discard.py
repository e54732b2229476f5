"""The discard receiver: a storage SCP that answers Success as soon as the last PDV of a dataset arrives and keeps
nothing. It measures the *driver's* ceiling (bench/driver.py reports it next to every real run): whatever rate
the driver reaches against it is the most it can offer any receiver on this machine.

It is the appliance's own Upper Layer (appliance.net.association.AssociationProtocol: PDU framing, negotiation,
DIMSE command decoding, release/abort) with the store path replaced: no volume, no blob, no index, no fsync.
One process, one uvloop loop; run it in its own process (``python -m bench.discard``) so it has its own core.

    python -m bench.discard --port 0 --port-file /tmp/discard.json     # prints/writes the port it got

On SIGTERM or SIGINT it writes its counters (associations, instances, dataset bytes) as JSON to --stats-file
(and stdout) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from appliance import errors
from appliance.config import Config, ServerConfig
from appliance.net import dimse
from appliance.net.association import AssociationProtocol, WorkerContext
from appliance.net.dimse import Command
from appliance.services.store import StoreResult

DEFAULT_AE = "DISCARD"


@dataclass
class Counters:
    associations: int = 0
    instances: int = 0
    dataset_bytes: int = 0


class DiscardOperation:
    """Stands in for services.store.StoreOperation: counts the dataset bytes, answers Success."""

    __slots__ = ("command", "result", "dataset_bytes", "counters")

    def __init__(self, command: Command, counters: Counters) -> None:
        self.command = command
        self.result: StoreResult | None = None
        self.dataset_bytes = 0
        self.counters = counters

    def feed(self, data: memoryview) -> None:
        self.dataset_bytes += len(data)

    def abandon(self) -> None:
        self.result = StoreResult(errors.PROCESSING_FAILURE, "association ended")

    async def finish(self) -> StoreResult:
        if self.result is not None:
            return self.result
        self.counters.instances += 1
        self.counters.dataset_bytes += self.dataset_bytes
        return StoreResult(errors.SUCCESS)


class DiscardContext(WorkerContext):
    """A WorkerContext without volumes, committer or shared slots; the metrics go to a private registry."""

    counters: Counters

    @classmethod
    def create(cls, ae_title: str = DEFAULT_AE, max_pdu: int = 1 << 20, max_associations: int = 1024) -> DiscardContext:
        from prometheus_client import CollectorRegistry

        from appliance.metrics import Metrics

        config = Config(server=ServerConfig(ae_title=ae_title, host="127.0.0.1", port=0, max_pdu=max_pdu,
                                            max_associations=max_associations, metrics_enabled=False))
        ctx = cast(DiscardContext, cls.build(config, volumes=None, committer=None, metrics=Metrics(CollectorRegistry())))
        ctx.counters = Counters()
        return ctx


class DiscardProtocol(AssociationProtocol):
    """AssociationProtocol whose C-STORE requests go to a DiscardOperation instead of the storage service."""

    ctx: DiscardContext

    def _on_associate_rq(self, raw: bytes) -> None:
        super()._on_associate_rq(raw)
        if self.has_slot:
            self.ctx.counters.associations += 1

    def _on_command(self, command: Command, context_id: int, context: tuple[str, str]) -> None:
        if command.command_field != dimse.C_STORE_RQ:
            return super()._on_command(command, context_id, context)
        op = DiscardOperation(command, self.ctx.counters)
        if command.affected_sop_class_uid != context[0]:
            op.result = StoreResult(errors.SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted on this context")
        if command.has_dataset:
            self.operation = op  # type: ignore[assignment]  # duck-typed StoreOperation
            self.operation_context = context_id
        else:
            op.result = StoreResult(errors.CANNOT_UNDERSTAND, "C-STORE without a dataset")
            self._spawn(self._respond_store(op, context_id))  # type: ignore[arg-type]


async def serve(host: str, port: int, ctx: DiscardContext, port_file: Path | None,
                stop: asyncio.Event | None = None) -> Counters:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DiscardProtocol(ctx), host, port, reuse_address=True, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": bound, "pid": os.getpid(), "ae": ctx.config.server.ae_title}))
        os.rename(tmp, port_file)
    print(f"discard receiver AE {ctx.config.server.ae_title} on {host}:{bound}", file=sys.stderr, flush=True)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for assoc in list(ctx.associations):
        assoc.abort(0x00, "shutting down")
    return ctx.counters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (see --port-file)")
    parser.add_argument("--ae", default=DEFAULT_AE, help=f"called AE title to accept (default {DEFAULT_AE})")
    parser.add_argument("--max-pdu", type=int, default=1 << 20, help="maximum PDU we receive (default 1 MiB)")
    parser.add_argument("--port-file", type=Path, help="write {port, pid, ae} here (atomically) once listening")
    parser.add_argument("--stats-file", type=Path, help="write the counters here as JSON at exit")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    ctx = DiscardContext.create(args.ae, args.max_pdu)
    counters: Any = asyncio.run(serve(args.host, args.port, ctx, args.port_file))
    stats = json.dumps(counters.__dict__)
    if args.stats_file is not None:
        args.stats_file.write_text(stats)
    print(stats, flush=True)
    if args.port_file is not None:
        args.port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
