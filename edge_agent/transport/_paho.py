"""paho-mqtt's client, imported without dnspython.

paho imports ``dns.resolver`` when it can, for ``connect_srv`` (DNS SRV discovery), which the
agent never calls; dnspython then costs an MQTT agent ~3-11 MiB of resident memory (measured
by ``python -m scripts.agent_footprint --by-import``). While paho's client module is imported,
``dns`` reads as absent (``sys.modules["dns"] = None`` makes ``import dns`` raise
``ImportError``, which paho handles), unless something in the process loaded it already.
"""

from __future__ import annotations

import sys

__all__ = ["mqtt"]

_hide_dns = "dns" not in sys.modules
if _hide_dns:
    sys.modules["dns"] = None  # type: ignore[assignment]
try:
    import paho.mqtt.client as mqtt
finally:
    if _hide_dns and sys.modules.get("dns", 0) is None:
        del sys.modules["dns"]
