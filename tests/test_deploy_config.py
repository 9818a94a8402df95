"""docker-compose.yml, Dockerfile.gpu, .dockerignore and deploy/ against the code.

No Docker engine runs here, so nothing is built or started: the files are parsed and every
command, module, path, port, environment variable, volume, route and metric name they use
is checked against the project (the settings classes, the FastAPI app's routes, the
metrics the code registers, the training CLI's parser).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support import deploy

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
APP_SERVICES = ("api", "worker", "train")
#: Variables that configure tools in the image (Python, pip, apt, venv), not shapserve.
TOOL_ENV = {
    "DEBIAN_FRONTEND", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK", "VIRTUAL_ENV", "PATH",
}  # fmt: skip
#: The samples prometheus-client exposes for a family, by type (counters are named without _total).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def defaults(value: str) -> str:
    """Compose interpolation with nothing set: ``${VAR:-default}`` -> default, ``${VAR}`` -> ''."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def settings_defaults() -> dict[str, object]:
    return deploy.settings_defaults()


@pytest.fixture(scope="module")
def env_names() -> set[str]:
    return set(deploy.env_names())


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return set(deploy.api_routes())


@pytest.fixture(scope="module")
def metric_names(redis_url: str) -> set[str]:
    """Names of every sample the code can expose: the module-level metrics of the service and
    worker packages, a worker's own families, and the queue-state gauges the explanation
    collector reads from Redis."""
    import pkgutil

    import redis
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    import service
    import worker
    from service.explain_metrics import ExplainCollector
    from worker.metrics import WorkerMetrics

    names: set[str] = set()
    for package in (service, worker):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if isinstance(value, MetricWrapperBase):
                    for family in value.describe():  # labelled metrics have no samples before use
                        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    own = CollectorRegistry()
    WorkerMetrics(registry=own).describe_worker("w", "q", "v")
    names.update(s.name for f in text_string_to_metric_families(generate_latest(own).decode()) for s in f.samples)
    conn = redis.Redis.from_url(redis_url)
    registry = CollectorRegistry()
    registry.register(ExplainCollector(lambda: (conn, "deploy-config-test")))
    text = generate_latest(registry).decode()
    conn.close()
    families = list(text_string_to_metric_families(text))
    assert any(f.name == "shapserve_explain_queue_depth" for f in families), text  # Redis was read
    names.update(sample.name for family in families for sample in family.samples)
    return names


def app_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: defaults(str(value)) for key, value in env.items()}


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for spec in service.get("volumes") or []:
        if isinstance(spec, dict):
            out.append((spec["source"], spec["target"]))
        else:
            src, dst, *_ = spec.split(":")
            out.append((src, dst))
    return out


def api_port(services: dict[str, dict]) -> int:
    return int(app_environment(services["api"])["PORT"])


# -- compose: services, commands, environment ------------------------------------------------------------


def test_the_services_and_their_profiles(services: dict[str, dict]) -> None:
    assert set(services) >= {"redis", "api", "lb", "worker", "prometheus", "grafana", "train"}
    for name in ("redis", "api", "lb", "worker", "prometheus"):
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
    assert services["grafana"]["profiles"] == ["grafana"]
    assert services["train"]["profiles"] == ["train"]


def test_app_services_build_the_gpu_image(services: dict[str, dict]) -> None:
    images = set()
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        images.add(services[name]["image"])
    assert len(images) == 1, "api, worker and train must run one image"


def test_commands_run_modules_and_scripts_that_exist(services: dict[str, dict]) -> None:
    from training.cli import build_parser

    run_spec = importlib.util.spec_from_file_location("shapserve_run_script", ROOT / "scripts" / "run.py")
    run_script = importlib.util.module_from_spec(run_spec)
    sys.modules[run_spec.name] = run_script  # dataclasses look their module up there
    run_spec.loader.exec_module(run_script)
    for name in APP_SERVICES:
        command = [defaults(str(arg)) for arg in services[name]["command"]]
        assert command[0] == "python", command
        if command[1] == "-m":
            module, args = command[2], command[3:]
            assert (ROOT / module / "__main__.py").is_file(), f"{name}: python -m {module} has no {module}/__main__.py"
            if module == "training":
                build_parser().parse_args(args)  # SystemExit (a failure) on a bad flag
        else:
            script, args = command[1], command[2:]
            assert (ROOT / script).is_file(), f"{name}: {script} does not exist"
            assert script == "scripts/run.py" and args[0] in run_script.COMMANDS, command


def test_environment_names_are_read_by_the_code(services: dict[str, dict], env_names: set[str]) -> None:
    for name in APP_SERVICES:
        unknown = set(app_environment(services[name])) - env_names
        assert not unknown, f"{name}: the code reads no variable named {sorted(unknown)}"


def test_environment_values_fit_the_settings(services: dict[str, dict]) -> None:
    from service.settings import Settings
    from shapcore.jobs.settings import ExplainSettings
    from training.presets import PROFILES

    for name in ("api", "worker"):
        env = app_environment(services[name])
        settings = (Settings if name == "api" else ExplainSettings)(**{k.lower(): v for k, v in env.items()})
        assert settings.redis_url == env["REDIS_URL"]
    train = app_environment(services["train"])
    assert train["TRAIN_PROFILE"] in PROFILES
    assert train["DATA"] == "cifar10"


def test_redis_urls_point_at_the_redis_service(services: dict[str, dict]) -> None:
    command = services["redis"]["command"]
    redis_port = int(command[command.index("--port") + 1]) if "--port" in command else 6379
    for name in ("api", "worker"):
        url = urlsplit(app_environment(services[name])["REDIS_URL"])
        assert url.hostname in services and url.hostname == "redis"
        assert url.port == redis_port


def test_redis_keeps_jobs_across_restarts(services: dict[str, dict], compose: dict) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1] if "--dir" in command else "/data"
    mounts = dict((dst, src) for src, dst in volume_mounts(services["redis"]))
    assert mounts.get(data_dir) in compose["volumes"], "Redis's data folder must be a named volume"


def test_ports_agree(services: dict[str, dict], settings_defaults: dict[str, object]) -> None:
    port = api_port(services)
    assert port == settings_defaults["PORT"], "the api's PORT differs from the service's default"
    assert "PORT" in app_environment(services["api"]) and app_environment(services["api"])["HOST"] == "0.0.0.0"
    assert str(port) in [str(p) for p in services["api"].get("expose", [])]
    # The load balancer: nginx listens on the container port lb publishes, and proxies to api:PORT.
    conf = NGINX_CONF.read_text()
    upstream = re.search(r"server\s+([a-z0-9_-]+):(\d+)\s+resolve;", conf)
    assert upstream and upstream.group(1) in services and upstream.group(1) == "api"
    assert int(upstream.group(2)) == port
    listen = int(re.search(r"listen\s+(\d+);", conf).group(1))
    published = [defaults(p).split(":")[-1] for p in services["lb"]["ports"]]
    assert str(listen) in published
    mounts = volume_mounts(services["lb"])
    assert ("./deploy/nginx/nginx.conf", "/etc/nginx/nginx.conf") in mounts


def test_replicas_are_possible(services: dict[str, dict]) -> None:
    for name in ("api", "worker"):
        assert "container_name" not in services[name], f"{name}: a fixed container name forbids --scale"
        assert not services[name].get("ports"), f"{name}: a published host port forbids --scale (use the lb)"


def test_gpu_reservations(services: dict[str, dict]) -> None:
    for name in APP_SERVICES:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name


def test_volumes_are_declared_and_bind_mounts_exist(services: dict[str, dict], compose: dict) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for src, _dst in volume_mounts(service):
            if src.startswith((".", "/", "$")):
                if "$" not in src:  # a path of the project (user-chosen ${...} ones are theirs)
                    assert (ROOT / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in declared, f"{name}: volume {src} is not declared"
                used.add(src)
    assert used == declared, f"declared but unused: {declared - used}"


def test_one_model_registry_for_trainer_api_and_workers(services: dict[str, dict]) -> None:
    dockerfile_env = dict(dockerfile_env_pairs())
    for name in APP_SERVICES:
        env = app_environment(services[name])
        registry = env.get("MODEL_REGISTRY", dockerfile_env["MODEL_REGISTRY"])
        assert ("models", registry) in volume_mounts(services[name]), f"{name}: the models volume is not at {registry}"


def test_api_healthcheck_is_a_real_route(services: dict[str, dict], routes: set[str]) -> None:
    test = " ".join(services["api"]["healthcheck"]["test"])
    url = urlsplit(re.search(r"https?://[^'\" ]+", test).group(0))
    assert url.path == "/readyz" and url.path in routes
    assert url.port == api_port(services)
    script = (ROOT / "scripts" / "healthcheck.py").read_text()
    for path in re.findall(r"/(?:readyz|healthz|metrics)\b", script):
        assert path in routes


# -- Dockerfile and build context ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = current.partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def dockerfile_env_pairs() -> list[tuple[str, str]]:
    pairs = []
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            pairs += [tuple(item.split("=", 1)) for item in shlex.split(args)]
    return pairs


def test_dockerfile_base_user_healthcheck_and_command(routes: set[str], settings_defaults: dict) -> None:
    instr = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instr if k == "ARG" and "=" in a}
    base = [a for k, a in instr if k == "FROM"]
    assert base == ["${CUDA_IMAGE}"] and "nvidia/cuda" in args["CUDA_IMAGE"] and "runtime" in args["CUDA_IMAGE"]
    assert any("pip install" in a and "torch" in a for k, a in instr if k == "RUN")
    users = [a for k, a in instr if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert any("useradd" in a and users[-1] in a for k, a in instr if k == "RUN")
    health = [a for k, a in instr if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/app/scripts/healthcheck.py" in health[0]
    cmd = json.loads(next(a for k, a in reversed(instr) if k == "CMD"))
    assert cmd == ["python", "-m", "service"] and (ROOT / "service" / "__main__.py").is_file()
    exposed = [int(a) for k, a in instr if k == "EXPOSE"]
    env = dict(dockerfile_env_pairs())
    assert exposed == [settings_defaults["PORT"]] and int(env["PORT"]) == settings_defaults["PORT"]


def test_dockerfile_environment_names_are_read_by_the_code(env_names: set[str]) -> None:
    unknown = {name for name, _ in dockerfile_env_pairs()} - env_names - TOOL_ENV
    assert not unknown, f"Dockerfile.gpu sets variables no code reads: {sorted(unknown)}"


def copied_sources() -> list[str]:
    sources = []
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def installed_packages() -> list[str]:
    """``<package>/__init__.py`` of every package pyproject.toml's setuptools section includes."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    names = [pattern.rstrip("*") for pattern in include]
    assert all((ROOT / name / "__init__.py").is_file() for name in names), names
    return [f"{name}/__init__.py" for name in names]


def script_closure(script: str) -> list[str]:
    """``script`` and the modules of scripts/ it imports, transitively."""
    import ast

    seen: list[str] = []
    todo = [script]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        for node in ast.walk(ast.parse((ROOT / current).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            todo += [f"scripts/{n}.py" for n in names if (ROOT / "scripts" / f"{n}.py").is_file()]
    return seen


def test_copied_files_exist_and_reach_the_build_context() -> None:
    included = build_context_files()
    for src in copied_sources():
        path = ROOT / src
        assert path.exists(), f"COPY {src}: no such file"
        if path.is_file():
            assert src in included, f"COPY {src}: excluded by .dockerignore"
        else:
            assert any(f.startswith(src.rstrip("/") + "/") for f in included), f"COPY {src}: excluded"
    # What the image needs at run time is in it: every package pyproject.toml installs, the
    # scripts the image runs and the script modules they import.
    scripts = (*script_closure("scripts/run.py"), "scripts/healthcheck.py")
    needed_files = (*installed_packages(), *scripts, "pyproject.toml")
    for needed in needed_files:
        copied = any(needed == s or needed.startswith(s.rstrip("/") + "/") for s in copied_sources())
        assert needed in included and copied, f"{needed} does not reach the image"


def test_build_context_is_small() -> None:
    files = build_context_files()
    size = sum((ROOT / f).stat().st_size for f in files)
    assert size < 5 * 1024 * 1024, f"build context of {size / 1e6:.1f} MB"
    for f in files:
        assert not f.startswith((".git/", ".venv/", "models/", "var/", "data/", "tests/", "bench/")), f
        assert "__pycache__" not in f and not f.endswith((".safetensors", ".pt", ".tar.gz")), f


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negate, re.compile(regex + "$")))
    return rules


def dockerignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def build_context_files() -> set[str]:
    rules = dockerignore_rules()
    keep_prefixes = [r.pattern for neg, r in rules if neg]
    out: set[str] = set()

    def walk(folder: Path) -> None:
        for entry in folder.iterdir():
            rel = entry.relative_to(ROOT).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                # Descend into an excluded folder only when a ! pattern may re-include below it.
                if not dockerignored(rel, rules) or any(p.startswith(re.escape(rel) + "/") for p in keep_prefixes):
                    walk(entry)
            elif not dockerignored(rel, rules):
                out.add(rel)

    walk(ROOT)
    return out


# -- Prometheus and Grafana ----------------------------------------------------------------------------


def promql_documents() -> dict[str, list[str]]:
    """Every PromQL expression shipped: recording rules, alerts, dashboard panels."""
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    exprs = {"alerts.yml": [r["expr"] for g in rules["groups"] for r in g["rules"]]}
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        exprs[path.name] = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs


def test_prometheus_mounts_and_scrapes_every_api_replica_and_worker(services: dict[str, dict]) -> None:
    prom = services["prometheus"]
    mounts = volume_mounts(prom)
    assert ("./deploy/prometheus", "/etc/prometheus") in mounts
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = PROM_DIR / Path(config_flag.split("=", 1)[1]).relative_to("/etc/prometheus")
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert (PROM_DIR / rule_file).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["api"]
    sd = api["dns_sd_configs"][0]
    assert sd["names"] == ["api"] and sd["type"] == "A" and sd["port"] == api_port(services)
    assert api.get("metrics_path", "/metrics") == "/metrics"
    worker = jobs["worker"]
    sd = worker["dns_sd_configs"][0]
    port = int(app_environment(services["worker"])["EXPLAIN_METRICS_PORT"])
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == port
    assert worker.get("metrics_path", "/metrics") == "/metrics"


def test_promql_uses_metrics_and_routes_the_code_has(metric_names: set[str], routes: set[str]) -> None:
    for source, exprs in promql_documents().items():
        for expr in exprs:
            for name in re.findall(r"\b(shapserve_[a-z0-9_]+)\b", expr):
                assert name in metric_names, f"{source}: {name} is not a metric of the code (in {expr!r})"
            for op, value in re.findall(r'route\s*(=~|=)\s*"([^"]+)"', expr):
                if op == "=":
                    assert value in routes, f"{source}: no route {value}"
                else:
                    assert any(re.fullmatch(value, r) for r in routes), f"{source}: {value} matches no route"


def test_the_alerts_the_issue_asks_for() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    all_rules = [r for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"]: r["expr"] for r in all_rules if "record" in r}
    alerts = {r["alert"]: r["expr"] for r in all_rules if "alert" in r}

    def expand(expr: str) -> str:
        for name, body in recorded.items():
            expr = expr.replace(name, f"({body})")
        return expr

    expanded = [expand(e) for e in alerts.values()]
    assert any("histogram_quantile(0.99" in e and 'route="/predict"' in e for e in expanded), "p99 predict latency"
    assert any('status=~"5.."' in e and "/" in e for e in expanded), "error ratio"
    assert any("shapserve_explain_queue_depth" in e for e in expanded), "queue depth"
    assert any("shapserve_model_accuracy" in e and "<" in e for e in expanded), "accuracy below a threshold"
    assert any('shapserve_auth_failures_total{reason="invalid_key"}' in e for e in expanded), "unknown API keys"
    assert any("shapserve_rate_limited_total" in e for e in expanded), "rate-limit refusals"


def test_grafana_provisioning(services: dict[str, dict]) -> None:
    mounts = dict(volume_mounts(services["grafana"]))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    ds = datasources["datasources"][0]
    assert urlsplit(ds["url"]).hostname in services and urlsplit(ds["url"]).port == 9090
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "shapserve.yml").read_text())
    assert mounts["./deploy/grafana/dashboards"] == providers["providers"][0]["options"]["path"]
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "shapserve.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
    exprs = " ".join(promql_documents()["shapserve.json"])
    for needed in ("shapserve_http_request_duration_seconds_bucket", "shapserve_http_requests_total",
                   "shapserve_batch_size_bucket", "shapserve_explain_queue_depth",
                   "shapserve_worker_job_duration_seconds_bucket", "shapserve_worker_jobs_total",
                   "shapserve_worker_model_evaluations_total", "shapserve_model_info",
                   "shapserve_model_accuracy"):  # fmt: skip
        assert needed in exprs, f"the dashboard shows nothing of {needed}"
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
