"""The control plane's services, one per feature, over a small shared ``Context``.

None imports grpc or paho (the API edge converts and delegates to them), and none calls back
up: the dependencies run one way, in this order::

    context (store, clock, config, keys, audit, authorize, releases, presence)
      <- identity, delivery, registry, rollouts, experiments, audit
      <- retraining (publishes through the registry, canaries through experiments)
      <- telemetry (vets samples through retraining, decides experiments)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.config import ControlPlaneConfig
from control_plane.services.audit import AuditService
from control_plane.services.authority import Authority
from control_plane.services.cluster_runner import ClusterRunner
from control_plane.services.context import Context
from control_plane.services.delivery import DeliveryService
from control_plane.services.detection import DetectionService
from control_plane.services.experiments import ExperimentService
from control_plane.services.identity import IdentityService
from control_plane.services.registry import RegistryService
from control_plane.services.retrain_runner import LocalRunner, Runner
from control_plane.services.retraining import RetrainService
from control_plane.services.rollouts import RolloutService
from control_plane.services.telemetry import TelemetryService
from control_plane.storage import Store

__all__ = ["Services"]


@dataclass(frozen=True)
class Services:
    ctx: Context
    identity: IdentityService
    delivery: DeliveryService
    registry: RegistryService
    rollouts: RolloutService
    experiments: ExperimentService
    retraining: RetrainService
    telemetry: TelemetryService
    audit: AuditService
    detection: DetectionService

    @classmethod
    def build(cls, config: ControlPlaneConfig, store: Store, keys: Authority, *,
              clock: Callable[[], float] = time.time) -> Services:
        ctx = Context(config, store, keys, clock=clock)
        registry = RegistryService(ctx)
        experiments = ExperimentService(ctx)
        runner: Runner = (LocalRunner() if config.retrain_runner == "local" else
                          ClusterRunner(config.retrain_cluster, config.retrain_runner,
                                        config.home / "retrain"))
        retraining = RetrainService(ctx, registry, experiments, runner)
        return cls(ctx=ctx, identity=IdentityService(ctx), delivery=DeliveryService(ctx),
                   registry=registry, rollouts=RolloutService(ctx), experiments=experiments,
                   retraining=retraining, telemetry=TelemetryService(ctx, experiments, retraining),
                   audit=AuditService(ctx), detection=DetectionService(ctx))
