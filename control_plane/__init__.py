"""The Edgefleet control plane: PKI and enrollment, fleet registry, audit (more to come)."""

from control_plane.config import ControlPlaneConfig
from control_plane.home import init_home
from control_plane.server import ControlPlane

__all__ = ["ControlPlane", "ControlPlaneConfig", "init_home"]
