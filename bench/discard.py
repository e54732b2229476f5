"""The discard receiver: a storage SCP that answers Success as soon as the last PDV of a dataset arrives and keeps
nothing. It measures the *driver's* ceiling (bench/driver.py reports it next to every real run): whatever rate
the driver reaches against it is the most it can offer any receiver on this machine.

It is the appliance's own Upper Layer (appliance.net.association.AssociationProtocol: PDU framing, negotiation,
DIMSE command decoding, release/abort) with another Application behind the same interface as the storage
service (net/service.py): no volume, no blob, no index, no fsync.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import errors
from appliance.config import Config, ServerConfig
from appliance.net import dimse
from appliance.net.association import AssociationProtocol, Endpoint
from appliance.net.service import Handler, Request, Response
from appliance.services.echo import echo_handler

DEFAULT_AE = "DISCARD"


@dataclass
class Counters:
    associations: int = 0
    instances: int = 0
    dataset_bytes: int = 0


class DiscardHandler:
    """Stands in for the storage service's handler: counts the dataset bytes, answers Success."""

    __slots__ = ("status", "dataset_bytes", "counters")

    def __init__(self, request: Request, counters: Counters) -> None:
        self.status = errors.SUCCESS
        if request.command.affected_sop_class_uid != request.abstract_syntax:
            self.status = errors.SOP_CLASS_NOT_SUPPORTED
        elif not request.command.has_dataset:
            self.status = errors.CANNOT_UNDERSTAND
        self.dataset_bytes = 0
        self.counters = counters

    def feed(self, data: memoryview) -> None:
        self.dataset_bytes += len(data)

    async def responses(self) -> AsyncIterator[Response]:
        if self.status == errors.SUCCESS:
            self.counters.instances += 1
            self.counters.dataset_bytes += self.dataset_bytes
        yield Response(self.status)

    def cancel(self) -> None:
        pass

    def abandon(self) -> None:
        self.status = errors.PROCESSING_FAILURE


class DiscardApplication:
    """The Application of the discard receiver: C-ECHO as the appliance, C-STORE counted and dropped."""

    def __init__(self, config: Config, counters: Counters) -> None:
        self.config = config
        self.counters = counters

    def handler(self, request: Request) -> Handler | None:
        field = request.command.command_field
        if field == dimse.C_ECHO_RQ:
            return echo_handler(self.config, request)
        if field == dimse.C_STORE_RQ:
            return DiscardHandler(request, self.counters)
        return None


class DiscardEndpoint(Endpoint):
    """An Endpoint without storage or shared slots; the metrics go to a private registry."""

    counters: Counters

    @classmethod
    def create(cls, ae_title: str = DEFAULT_AE, max_pdu: int = 1 << 20, max_associations: int = 1024) -> DiscardEndpoint:
        from prometheus_client import CollectorRegistry

        from appliance.metrics import Metrics

        # The benchmark drives many associations from one host and one AE title: per-peer limits off.
        config = Config(server=ServerConfig(ae_title=ae_title, host="127.0.0.1", port=0, max_pdu=max_pdu,
                                            max_associations=max_associations, metrics_enabled=False,
                                            max_connections_per_worker=2 * max_associations,
                                            max_associations_per_ae=max_associations,
                                            max_associations_per_host=max_associations))
        counters = Counters()
        ep = cls(config, DiscardApplication(config, counters), Metrics(CollectorRegistry()))
        ep.counters = counters
        return ep

    def snapshot(self) -> Counters:
        self.counters.associations = self.accepted
        return self.counters


DiscardContext = DiscardEndpoint  # the name the harness used before the service seam


async def serve(host: str, port: int, ctx: DiscardEndpoint, port_file: Path | None,
                stop: asyncio.Event | None = None) -> Counters:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AssociationProtocol(ctx), host, port, reuse_address=True, backlog=1024)
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
    for assoc in list(ctx.connections):
        assoc.abort(0x00, "shutting down")
    return ctx.snapshot()


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
    ctx = DiscardEndpoint.create(args.ae, args.max_pdu)
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
