"""The Edgefleet edge agent: enrollment, staying in touch, and (later) serving models."""

from edge_agent._version import __version__
from edge_agent.daemon import Agent
from edge_agent.enroll import enroll
from edge_agent.state import AgentConfig, StateDir

__all__ = ["Agent", "AgentConfig", "StateDir", "__version__", "enroll"]
