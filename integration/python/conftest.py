"""Fixtures that run Weft's real binaries (built by `cargo xtask test`) against real third-party peers."""

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BIN_DIR = Path(os.environ.get("WEFT_BIN_DIR", Path(__file__).resolve().parents[2] / "target" / "debug"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, deadline: float = 15.0) -> None:
    until = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > until:
                raise TimeoutError(f"nothing listening on {host}:{port} after {deadline}s")
            time.sleep(0.05)


class Processes:
    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs = []

    def start(self, name: str, args, env=None):
        log = open(self.logdir / f"{name}.log", "wb")
        full_env = dict(os.environ, RUST_LOG="info")
        full_env.update(env or {})
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        self.procs.append((name, proc, log))
        return proc

    def logs(self) -> str:
        out = []
        for name, _, log in self.procs:
            log.flush()
            out.append(f"--- {name} ---\n" + (self.logdir / f"{name}.log").read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def stop(self):
        for _, proc, log in self.procs:
            proc.terminate()
        for _, proc, log in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="weft-peer-") as d:
        yield Path(d)


@pytest.fixture
def procs(workdir, request):
    p = Processes(workdir)
    yield p
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(p.logs())
    p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def start_weftd(procs: Processes, config_dir: Path) -> int:
    port = free_port()
    procs.start(
        "weftd",
        [str(BIN_DIR / "weftd"), "--config-dir", str(config_dir), "--xds-address", f"127.0.0.1:{port}",
         "--monitoring-address", f"127.0.0.1:{free_port()}",
         "--secure-address", f"127.0.0.1:{free_port()}",
         "--state-dir", str(config_dir.parent / "weftd-state")],
    )
    wait_for_port("127.0.0.1", port)
    return port
