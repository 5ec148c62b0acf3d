"""The agent version, reported at enrollment and in every heartbeat."""

__version__ = "0.1.0"
