"""Readiness of the control plane for the kubelet: grpc.health.v1 ``Check`` (service "",
the whole server) over TLS on the enrollment port, trusting the fleet CA in the home.

The kubelet's own ``grpc:`` probe speaks plaintext HTTP/2 and cannot reach a TLS port, and
the API port also wants a client certificate; the enrollment port serves the same health
service with server-only TLS. Exit 0 only on SERVING.
usage: python health-probe.py HOME HOST:PORT SERVER_NAME
"""

import sys

import grpc

SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}; the request for "" is empty


def main(home: str, address: str, server_name: str) -> int:
    with open(f"{home}/pki/ca.pem", "rb") as fh:
        creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(address, creds, options=options) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            reply = check(b"", timeout=3)
        except grpc.RpcError as exc:
            print(f"not ready: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if reply != SERVING:
        print(f"not ready: health status {reply!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
