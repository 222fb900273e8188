"""grpcio's proxyless xDS client, which no one here wrote, resolves a service from weftd and balances over it."""

import json
import os
from concurrent import futures

import grpc

from conftest import free_port, start_weftd

METHOD = "/weft.test.Echo/Who"


def serve(name: str, port: int) -> grpc.Server:
    def who(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "weft.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def manifests(ports):
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "test"},
         "spec": {"ports": [{"name": "grpc-echo", "port": 9090}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "echo", "namespace": "test"},
         "spec": {"host": "echo", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}},
    ]
    for i, port in enumerate(ports):
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"echo-{i}", "namespace": "test",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc-echo", "port": port}],
            "endpoints": [{"addresses": ["127.0.0.1"]}],
        })
    # JSON is YAML, and keeps this file free of a YAML dependency.
    return "\n---\n".join(json.dumps(d) for d in docs)


def bootstrap(workdir, xds_port):
    """A bootstrap as Istio's agent writes one for a proxyless gRPC client."""
    path = workdir / "bootstrap.json"
    path.write_text(json.dumps({
        "xds_servers": [{"server_uri": f"127.0.0.1:{xds_port}", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "sidecar~127.0.0.1~pyclient-0.test~test.svc.cluster.local",
                 "metadata": {"GENERATOR": "grpc", "NAMESPACE": "test"}},
    }))
    return path


def answers_from(target, calls=30):
    """Who answered each call, after every endpoint gRPC will use has had time to connect."""
    with grpc.insecure_channel(target) as channel:
        who = channel.unary_unary(METHOD)
        for _ in range(20):
            who(b"", timeout=10, wait_for_ready=True)
        return [who(b"", timeout=10).decode() for _ in range(calls)]


def test_serviceentry_and_not_ready_endpoints(workdir, procs):
    """No DestinationRule, so weftd's default balancing; a ServiceEntry selecting WorkloadEntries; and a
    Service whose slice lists a not-ready endpoint that must never be called."""
    ports = [free_port() for _ in range(4)]
    servers = [serve(f"server-{i}", p) for i, p in enumerate(ports)]
    try:
        config = workdir / "config"
        config.mkdir()
        docs = [
            {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "ext", "namespace": "test"},
             "spec": {"hosts": ["ext.example.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                      "ports": [{"number": 7070, "name": "grpc", "protocol": "GRPC"}],
                      "workloadSelector": {"labels": {"app": "ext"}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "test"},
             "spec": {"ports": [{"name": "grpc-echo", "port": 9090}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-0", "namespace": "test", "labels": {"kubernetes.io/service-name": "echo"}},
             "addressType": "IPv4", "ports": [{"name": "grpc-echo", "port": ports[2]}],
             "endpoints": [{"addresses": ["127.0.0.1"]}]},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-1", "namespace": "test", "labels": {"kubernetes.io/service-name": "echo"}},
             "addressType": "IPv4", "ports": [{"name": "grpc-echo", "port": ports[3]}],
             "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]},
        ]
        for i in range(2):
            docs.append({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                         "metadata": {"name": f"ext-{i}", "namespace": "test"},
                         "spec": {"address": "127.0.0.1", "labels": {"app": "ext"}, "ports": {"grpc": ports[i]}}})
        (config / "mesh.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
        xds_port = start_weftd(procs, config)
        os.environ["GRPC_XDS_BOOTSTRAP"] = str(bootstrap(workdir, xds_port))
        ext = answers_from("xds:///ext.example.internal:7070")
        assert set(ext) == {"server-0", "server-1"}, ext
        echo = answers_from("xds:///echo.test.svc.cluster.local:9090", calls=10)
        assert set(echo) == {"server-2"}, f"the not-ready endpoint was called: {echo}"
    finally:
        for s in servers:
            s.stop(None)


def test_proxyless_grpc_client_balances_over_all_endpoints(workdir, procs):
    ports = [free_port() for _ in range(3)]
    servers = [serve(f"server-{i}", p) for i, p in enumerate(ports)]
    try:
        config = workdir / "config"
        config.mkdir()
        (config / "echo.yaml").write_text(manifests(ports))
        xds_port = start_weftd(procs, config)
        os.environ["GRPC_XDS_BOOTSTRAP"] = str(bootstrap(workdir, xds_port))
        with grpc.insecure_channel("xds:///echo.test.svc.cluster.local:9090") as channel:
            who = channel.unary_unary(METHOD)
            # grpc's round robin only picks connected subchannels, so warm up until all have answered.
            seen = set()
            for _ in range(100):
                seen.add(who(b"", timeout=10, wait_for_ready=True).decode())
                if len(seen) == 3:
                    break
            assert seen == {"server-0", "server-1", "server-2"}, seen
            answers = [who(b"", timeout=10).decode() for _ in range(30)]
        # Round robin, as the DestinationRule asks: every endpoint gets an equal share.
        assert all(answers.count(s) == 10 for s in seen), answers
    finally:
        for s in servers:
            s.stop(None)
