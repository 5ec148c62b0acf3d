"""The Edgefleet control plane, in layers (imports run one way, down this list):

* ``server``, ``cli``: the process and its command line, which wire the layers together;
* ``api/``: the edge: protobuf conversions and both front ends (gRPC, the MQTT bridge);
* ``ops/``: operator tools apart from the serving path (init, backup/restore, broker config);
* ``services/``: one service per feature over a shared context (no grpc, no paho);
* ``storage/``: the ``Store`` interface, SQLite, migrations, encrypted blobs, heartbeat batching;
* ``domain/``: the pure rules and records (no I/O, no clock).
"""

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.server import ControlPlane

__all__ = ["ControlPlane", "ControlPlaneConfig", "init_home"]
