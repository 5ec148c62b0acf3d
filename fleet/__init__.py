"""`fleet`: the operator's command-line client of the control plane's AdminService (mTLS).

It needs only the wire contracts (``edgefleet.v1``), ``fleetcore``, gRPC, protobuf and
cryptography, so an operator's machine installs ``edgefleet[fleet]`` without the control-plane
server, its scheduler or MQTT. Its config (``fleet.toml``) is ``fleetcore.operator_config``.
Run it as ``fleet ...`` or ``python -m fleet ...``.
"""
