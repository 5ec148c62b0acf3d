"""The mTLS channel to the control-plane API that an operator config describes."""

from __future__ import annotations

import grpc

from fleetcore.operator_config import OperatorConfig

__all__ = ["MAX_REPLY_BYTES", "open_channel"]

MAX_REPLY_BYTES = 64 * 1024 * 1024


def open_channel(cfg: OperatorConfig) -> grpc.Channel:
    """A channel to ``cfg.api`` that presents the operator's certificate and trusts only the
    fleet CA."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=cfg.ca.read_bytes(),
        private_key=cfg.key.read_bytes(),
        certificate_chain=cfg.cert.read_bytes(),
    )
    # One model's whole manifest (`fleet models show NAME VERSION`) may be several megabytes
    # of lineage; listings carry summaries only.
    return grpc.secure_channel(cfg.api, creds, options=[
        ("grpc.max_receive_message_length", MAX_REPLY_BYTES)])
