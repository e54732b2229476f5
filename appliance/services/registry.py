"""The table of DIMSE services beyond C-ECHO and C-STORE: (command field, SOP class) -> (right needed, handler
factory). Each service module registers its handlers here when imported; services/application.py imports those
modules and dispatches through the table. Kept apart from application.py so that neither imports the other."""

from __future__ import annotations

from collections.abc import Callable

from appliance.net.service import Handler, Request
from appliance.services.context import WorkerContext

HandlerFactory = Callable[[WorkerContext, Request], Handler]

# The right is checked by the dispatch, once, before any handler exists (services/rights.py).
SERVICES: dict[tuple[int, str], tuple[str, HandlerFactory]] = {}


def register(command_field: int, sop_classes: tuple[str, ...], right: str, factory: HandlerFactory) -> None:
    for sop_class in sop_classes:
        SERVICES[(command_field, sop_class)] = (right, factory)
