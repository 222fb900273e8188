"""The Prometheus project's own text parser reads weft-proxy's /stats/prometheus, on 15090 and merged
with the app's metrics on 15020."""

import http.client
import http.server
import json
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import start_weftd, wait_for_port

PROXY_IP = "127.0.0.71"


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class AppMetrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"# HELP app_orders_total Orders taken.\n# TYPE app_orders_total counter\napp_orders_total 3\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def manifests(backend_port):
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "test"},
         "spec": {"ports": [{"name": "http", "port": 9080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "test", "labels": {"kubernetes.io/service-name": "web"}},
         "ports": [{"name": "http", "port": backend_port}], "endpoints": [{"addresses": ["127.0.0.1"]}]},
        {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "client", "namespace": "test"},
         "spec": {"workloadSelector": {"labels": {"app": "client"}},
                  "egress": [{"port": {"number": 9080, "protocol": "HTTP", "name": "http"},
                              "captureMode": "NONE", "hosts": ["./*"]}]}},
    ]
    return "\n---\n".join(json.dumps(d) for d in docs)


def test_prometheus_parser_reads_istio_metrics(workdir, procs):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    app_metrics = http.server.ThreadingHTTPServer((PROXY_IP, 0), AppMetrics)
    threading.Thread(target=app_metrics.serve_forever, daemon=True).start()
    try:
        config = workdir / "config"
        config.mkdir()
        (config / "web.yaml").write_text(manifests(backend.server_address[1]))
        xds_port = start_weftd(procs, config)
        from conftest import BIN_DIR
        procs.start("weft-proxy", [str(BIN_DIR / "weft-proxy"), "--xds-address", f"http://127.0.0.1:{xds_port}"], env={
            "POD_NAME": "client-0", "POD_NAMESPACE": "test", "INSTANCE_IP": PROXY_IP,
            "ISTIO_METAJSON_LABELS": json.dumps({"app": "client", "version": "v1"}),
            "ISTIO_PROMETHEUS_ANNOTATIONS": json.dumps(
                {"scrape": "true", "port": str(app_metrics.server_address[1]), "path": "/metrics"}),
        })
        wait_for_port(PROXY_IP, 9080)
        for _ in range(7):
            conn = http.client.HTTPConnection(PROXY_IP, 9080, timeout=10)
            conn.request("GET", "/", headers={"Host": "web.test.svc.cluster.local:9080"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"hello")
            conn.close()
        text = urllib.request.urlopen(f"http://{PROXY_IP}:15090/stats/prometheus", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        requests = families["istio_requests"]
        assert requests.type == "counter"
        ok = [s for s in requests.samples if s.name == "istio_requests_total" and s.labels["response_code"] == "200"]
        assert len(ok) == 1 and ok[0].value == 7, ok
        labels = ok[0].labels
        assert labels["reporter"] == "source"
        assert labels["source_workload"] == "client-v1"
        assert labels["destination_service"] == "web.test.svc.cluster.local"
        duration = families["istio_request_duration_milliseconds"]
        assert duration.type == "histogram"
        assert any(s.name.endswith("_count") and s.value == 7 for s in duration.samples)
        ready = urllib.request.urlopen(f"http://{PROXY_IP}:15000/ready", timeout=10)
        assert ready.status == 200

        merged = urllib.request.urlopen(f"http://{PROXY_IP}:15020/stats/prometheus", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(merged)}
        assert families["istio_requests"].type == "counter"
        assert families["app_orders"].type == "counter"
        assert [s.value for s in families["app_orders"].samples] == [3]
        ready = urllib.request.urlopen(f"http://{PROXY_IP}:15021/healthz/ready", timeout=10)
        assert ready.status == 200
    finally:
        backend.shutdown()
        app_metrics.shutdown()
