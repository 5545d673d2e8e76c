"""deploy/ fits the code: every file parses, and ports, probe paths, setting names, metric and label
names, grace periods and credentials agree with what the service really has. No Docker engine or cluster
runs here, so these checks read the files; promtool (Debian's `prometheus` package) and systemd-analyze
run where they are installed, and promtool is required in CI (ORCH_TEST_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from dotenv import dotenv_values
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.aep.simulator_config import SimulatorConfig
from orchestrator.http import Probes, make_app
from orchestrator.metrics import NAMES, Metrics
from orchestrator.settings import NOT_SETTINGS, NOT_SETTINGS_PREFIXES, Settings, load_settings
from tests.conftest import require_command

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "orchestrator.service"
UNIT_ENV = DEPLOY / "systemd" / "orchestrator.env.example"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "orchestrator.json"

HTTP_PORT = Settings().http.port
GRACE = Settings().shutdown.grace
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
PLACEHOLDER = "REPLACE_ME"


# --- reading the files ------------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """The manifests by kind (one object of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_documents(path):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments and parser directives left out."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "a continuation line ends the Dockerfile"
    return instructions


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        key, equals, value = stripped.partition("=")
        assert current is not None, f"{path.name}:{number}: outside a section"
        assert equals, f"{path.name}:{number}: not Key=Value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(text: str) -> float:
    """A duration as compose ("40s", "1m30s") or systemd ("40", "40s", "1min") write it."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert "".join(n + u for n, u in parts) == text.replace(" ", ""), f"not a duration: {text}"
    assert parts, f"not a duration: {text}"
    return sum(float(number) * units[unit] for number, unit in parts)


def compose() -> dict[str, Any]:
    [doc] = yaml_documents(COMPOSE)
    return doc  # type: ignore[no-any-return]


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service]["environment"]
    assert isinstance(env, dict), "environment as a mapping, so that each value is checked"
    return {key: str(value) for key, value in env.items()}


def k8s_env() -> dict[str, str]:
    objects = k8s_objects()
    return {**objects["ConfigMap"]["data"], **objects["Secret"]["stringData"]}


def unit_env() -> dict[str, str]:
    return {key: value or "" for key, value in dotenv_values(UNIT_ENV).items()}


def deploy_files() -> list[Path]:
    return sorted(path for path in DEPLOY.rglob("*") if path.is_file())


# --- what the code has --------------------------------------------------------------------------------


def known_variables() -> set[str]:
    """Every ORCH_ variable that is a setting, built from the Settings model as settings.py builds it."""
    names = set()
    for section, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type)
        names |= {f"ORCH_{section}__{name}".upper() for name in field.annotation.model_fields}
    return names


def routes() -> set[str]:
    async def nothing_wrong() -> dict[str, str]:
        return {}

    # The store is reached only by /batches requests, which these tests never make.
    app = make_app(Probes(list, nothing_wrong), Metrics(), store=None)  # type: ignore[arg-type]
    return {route.resource.canonical for route in app.router.routes() if route.resource is not None}


def metric_labels() -> dict[str, frozenset[str]]:
    """Exported name (as in NAMES) -> its label names. prometheus-client has no public accessor for a
    metric's label names, and a labelled series appears in the exposition only once it is observed, so
    the names are read from the registry's collectors."""
    labels: dict[str, frozenset[str]] = {}
    registry = Metrics().registry
    for collector in registry._collector_to_names:
        name = collector._name + ("_total" if collector._type == "counter" else "")  # type: ignore[attr-defined]
        labels[name] = frozenset(collector._labelnames)  # type: ignore[attr-defined]
    assert set(labels) == set(NAMES)
    return labels


def preset_label_values() -> dict[tuple[str, str], set[str]]:
    """(metric, label) -> every value it takes, for the labels whose series exist from the start
    (outcome, message and token results, backlog states): metrics.py creates all of them up front."""
    values: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(Metrics().exposition().decode()):
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(value)
    return values


# --- PromQL, just enough to find the metrics and labels an expression names ---------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring"})
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported(series: str) -> str | None:
    """The NAMES entry a series name belongs to (histograms' _bucket, _sum, _count), or None."""
    if series in NAMES:
        return series
    for suffix in _HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in NAMES:
            return base
    return None


def metric_names(expr: str) -> list[str]:
    """Every metric name in `expr`: identifiers that are neither functions, keywords, label names (in
    braces and grouping clauses) nor durations."""
    text = _SELECTOR.sub(lambda m: m.group(1), expr)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", _STRING.sub('""', text))
    names = []
    for match in _IDENTIFIER.finditer(text):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.append(match.group(1))
    # Selectors with no name before the braces do not occur in these files.
    return names


def check_expr(expr: str, where: str) -> None:
    labels = metric_labels()
    preset = preset_label_values()
    names = metric_names(expr)
    assert names, f"{where}: names no metric: {expr}"
    unknown = [name for name in names if exported(name) is None]
    assert not unknown, f"{where}: {unknown} not exported by the service (orchestrator.metrics.NAMES)"
    allowed_everywhere = set(TARGET_LABELS)
    for name in names:
        allowed_everywhere |= labels[exported(name) or name]
        if name.endswith("_bucket"):
            allowed_everywhere.add("le")
    for selector in _SELECTOR.finditer(expr):
        name = selector.group(1)
        base = exported(name)
        own = labels[base or name] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        for label, operator, value in _MATCHER.findall(selector.group(2)):
            assert label in own, f"{where}: {name} has no label {label!r} (it has {sorted(own)})"
            known = preset.get((name, label))
            if known is None or operator not in {"=", "=~"} or "$" in value:
                continue
            alternatives = value.split("|") if operator == "=~" else [value]
            if operator == "=~" and not all(re.fullmatch(r"[\w-]+", a) for a in alternatives):
                continue  # a real regular expression: not a list of values
            stray = sorted(set(alternatives) - known)
            assert not stray, f"{where}: {name}{{{label}}} never takes {stray} (only {sorted(known)})"
    for clause in _GROUPING.findall(expr):
        for label in (part.strip() for part in clause.split(",")):
            if label:
                assert label in allowed_everywhere, f"{where}: no metric of the expression has {label!r}"


def alert_rules() -> list[dict[str, Any]]:
    [doc] = yaml_documents(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> Iterator[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in board["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                yield f"panel {sub['title']!r} {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            yield f"variable {variable['name']}", inner.group(1) if inner else query


# --- every file parses ---------------------------------------------------------------------------------


def test_every_deploy_file_is_known_and_parses() -> None:
    readers = {
        ".yaml": yaml_documents,
        ".yml": yaml_documents,
        ".json": lambda p: json.loads(p.read_text(encoding="utf-8")),
        ".service": systemd_unit,
        ".example": dotenv_values,
        ".dockerignore": lambda p: p.read_text(encoding="utf-8").splitlines(),
    }
    for path in deploy_files():
        if path == DOCKERFILE:
            assert dockerfile()
            continue
        assert path.suffix in readers, f"{path.relative_to(ROOT)}: no test reads this kind of file"
        assert readers[path.suffix](path), f"{path.relative_to(ROOT)} is empty"


def test_no_real_credentials() -> None:
    """Client secrets are the simulator's public demo one or a placeholder; nothing else secret-looking."""
    simulator = SimulatorConfig()
    allowed = {PLACEHOLDER, simulator.client_secret}
    for env in (compose_env("orchestrator"), k8s_env(), unit_env()):
        assert env["ORCH_AEP__CLIENT_SECRET"] in allowed
        assert "ORCH_AEP__ACCESS_TOKEN" not in env
    for key, value in k8s_objects()["Secret"]["stringData"].items():
        assert PLACEHOLDER in value, f"Secret {key}: a placeholder, clearly marked"
    for key, value in unit_env().items():
        if "SECRET" in key or ("URL" in key and "@" in value):
            assert PLACEHOLDER in value, f"{UNIT_ENV.name} {key}: a placeholder"


# --- settings ------------------------------------------------------------------------------------------


def test_every_orch_variable_named_in_deploy_is_a_setting() -> None:
    """Comments included: an operator copies names from them."""
    known = known_variables()
    for path in deploy_files():
        for name in re.findall(r"\bORCH_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
            if name in NOT_SETTINGS or name.startswith(NOT_SETTINGS_PREFIXES):
                continue
            assert name in known, f"{path.relative_to(ROOT)}: {name} is not a setting"


@pytest.mark.parametrize(
    "source", ["compose orchestrator", "k8s ConfigMap + Secret", "systemd env file"], ids=str
)
def test_deploy_settings_load(source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The service's own loader accepts each file's settings (names and values) and has credentials."""
    env = {
        "compose orchestrator": compose_env("orchestrator"),
        "k8s ConfigMap + Secret": k8s_env(),
        "systemd env file": unit_env(),
    }[source]
    for name in list(os.environ):
        if name.upper().startswith("ORCH_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # away from any .env a developer keeps in the repository
    settings = load_settings()
    assert settings.aep.credentials_problems() == []
    assert settings.http.port == HTTP_PORT


# --- ports, paths and grace ------------------------------------------------------------------------------


def test_dockerfile() -> None:
    instructions = dockerfile()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: build, then a runtime without the build tools"
    assert " AS " in stages[0].upper()
    runtime = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    found = {keyword: args for keyword, args in runtime}
    user = found["USER"].split(":")[0]
    assert user.isdigit(), "a numeric user: runAsNonRoot can check it"
    assert int(user) != 0, "not root"
    assert str(HTTP_PORT) in found["EXPOSE"].split()
    assert found["WORKDIR"] == "/app"
    assert json.loads(found["VOLUME"]) == ["/app/var"], "the embedded SQLite defaults are under var/"
    assert json.loads(found["ENTRYPOINT"]) == ["orchestrator"]
    assert json.loads(found["CMD"]) == ["run"]
    assert "[all]" in " ".join(args for keyword, args in runtime if keyword == "RUN")


def healthcheck_command() -> list[str]:
    [args] = [args for keyword, args in dockerfile() if keyword == "HEALTHCHECK"]
    command = json.loads(args[args.index("CMD") + len("CMD") :].strip())
    assert isinstance(command, list), "the exec form: no shell in the way"
    return command


def test_dockerfile_healthcheck_asks_healthz_on_the_http_port() -> None:
    code = " ".join(healthcheck_command())
    assert "/healthz" in code
    assert "/healthz" in routes()
    assert f"os.environ.get('ORCH_HTTP__PORT', '{HTTP_PORT}')" in code


async def test_dockerfile_healthcheck_passes_on_200_and_fails_on_503() -> None:
    """The image's HEALTHCHECK command itself, run against the real app: a 503 must fail it."""
    problems: list[str] = []

    async def nothing_wrong() -> dict[str, str]:
        return {}

    app = make_app(Probes(lambda: problems, nothing_wrong), Metrics(), store=None)  # type: ignore[arg-type]
    command = healthcheck_command()
    assert command[0] == "python"
    command[0] = sys.executable
    async with TestServer(app, host="127.0.0.1") as server:
        env = {**os.environ, "ORCH_HTTP__PORT": str(server.port)}

        async def check() -> int:
            process = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            return await asyncio.wait_for(process.wait(), 20)

        assert await check() == 0
        problems.append("dispatcher stopped")
        assert await check() != 0


def test_compose_fits_together() -> None:
    doc = compose()
    services = doc["services"]
    assert {"orchestrator", "simulator", "rabbitmq", "postgres", "redis", "prometheus"} <= set(services)
    for name in ("orchestrator", "simulator"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE.parent / services[name]["build"]["context"] / "deploy" / "Dockerfile").is_file()
    orchestrator = services["orchestrator"]
    env = compose_env("orchestrator")
    assert env["ORCH_QUEUE__URL"].startswith("amqp://orchestrator:orchestrator@rabbitmq:5672/")
    assert env["ORCH_STORE__URL"].startswith("postgresql://orchestrator:orchestrator@postgres:5432/")
    assert env["ORCH_LIMITS__REDIS_URL"].startswith("redis://redis:")
    # The HTTP port: the setting, the published port, the healthcheck and the scrape target agree.
    port = int(env.get("ORCH_HTTP__PORT", HTTP_PORT))
    assert port == HTTP_PORT
    assert [str(p).rsplit(":", 1)[-1] for p in orchestrator["ports"]] == [str(port)]
    check = " ".join(orchestrator["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in check
    # The simulator: reachable from the other containers, and the credentials it accepts.
    simulator = services["simulator"]
    command = simulator["command"]
    assert command[0] == "simulate"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    sim_port = command[command.index("--port") + 1]
    for key in ("ORCH_AEP__BASE_URL", "ORCH_AEP__IMS_URL"):
        assert env[key] == f"http://simulator:{sim_port}"
    accepted = SimulatorConfig()
    for flag, value in (("--client-id", accepted.client_id), ("--client-secret", accepted.client_secret)):
        if flag in command:
            value = command[command.index(flag) + 1]
        assert value in (env["ORCH_AEP__CLIENT_ID"], env["ORCH_AEP__CLIENT_SECRET"])
    assert env["ORCH_AEP__ORG_ID"] == accepted.org_id
    assert f"127.0.0.1:{sim_port}/" in " ".join(simulator["healthcheck"]["test"])
    # Started only once what it needs answers its healthcheck.
    for dependency, condition in orchestrator["depends_on"].items():
        assert condition == {"condition": "service_healthy"}
        assert "healthcheck" in services[dependency]
    assert seconds(orchestrator["stop_grace_period"]) > float(env.get("ORCH_SHUTDOWN__GRACE", GRACE))
    # Prometheus reads the files of this directory.
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["prometheus"]["volumes"] if "/" in m}
    for inside in ("/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"):
        assert (COMPOSE.parent / mounts[inside]).resolve().is_file()


def test_prometheus_scrapes_the_orchestrator_and_loads_the_rules() -> None:
    [config] = yaml_documents(PROMETHEUS / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()
    assert ALERTS.name in config["rule_files"]
    [job] = config["scrape_configs"]
    assert job["metrics_path"] in routes()
    # Every replica of the compose service, found by its name.
    [lookup] = job["dns_sd_configs"]
    assert lookup["names"] == ["orchestrator"]
    assert "orchestrator" in compose()["services"]
    assert lookup["port"] == HTTP_PORT


def test_kubernetes_fits_together() -> None:
    objects = k8s_objects()
    assert {"Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= set(objects)
    kustomization = objects.pop("Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    deployment = objects["Deployment"]
    spec = deployment["spec"]
    if spec["replicas"] > 1:
        # Several replicas are safe only on PostgreSQL with the limit shared through Redis.
        assert k8s_env()["ORCH_STORE__URL"].startswith("postgresql://")
        assert k8s_env()["ORCH_LIMITS__REDIS_URL"].startswith("redis")
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= pod["metadata"]["labels"].items(), f"the {kind} selects the pod"
    [container] = pod["spec"]["containers"]
    assert container["args"] == ["run"]
    env = k8s_env()
    sources = {next(iter(ref.values()))["name"]: next(iter(ref)) for ref in container["envFrom"]}
    assert sources == {
        objects["ConfigMap"]["metadata"]["name"]: "configMapRef",
        objects["Secret"]["metadata"]["name"]: "secretRef",
    }
    # Ports: the setting, the container port, the probes, the Service and the scrape annotations.
    port = int(env.get("ORCH_HTTP__PORT", HTTP_PORT))
    assert port == HTTP_PORT
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["http"] == port
    paths = routes()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)):
        get = container[probe]["httpGet"]
        assert get["path"] in paths
        assert path is None or get["path"] == path
        assert named.get(get["port"], get["port"]) == port
    [service_port] = objects["Service"]["spec"]["ports"]
    assert named.get(service_port["targetPort"], service_port["targetPort"]) == port
    for annotated in (pod, objects["Service"]):
        notes = annotated["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == port
        assert notes["prometheus.io/path"] in paths
    # Graceful stop: the kubelet's SIGKILL comes after the service's own grace.
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env.get("ORCH_SHUTDOWN__GRACE", GRACE))
    # Non-root, bounded.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert pod["spec"]["enableServiceLinks"] is False, "injected *_PORT variables could start with ORCH_"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/app/var" in mounts, "the image's writable directory stays writable on a read-only root"


def test_systemd_unit() -> None:
    unit = systemd_unit(UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] in {"exec", "simple"}
    assert service["User"] not in {"", "root"}
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["RestartPreventExitStatus"] == "2", "a configuration error does not heal by restarting"
    assert shlex.split(service["ExecStart"])[1:] == ["run"]
    grace = float(unit_env().get("ORCH_SHUTDOWN__GRACE", GRACE))
    assert seconds(service["TimeoutStopSec"]) > max(grace, GRACE)
    for option in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictSUIDSGID",
    ):
        assert service.get(option) == "true", option
    assert service["ProtectSystem"] == "strict"
    # ProtectSystem=strict leaves only these writable: the working directory must be one of them.
    writable = service["ReadWritePaths"].split()
    assert any(service["WorkingDirectory"].startswith(path) for path in writable)
    assert set(service["RestrictAddressFamilies"].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze (from the systemd package) rejects nothing in the unit. It wants ExecStart to
    exist, so the copy checked points at this virtualenv's `orchestrator`."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    executable = Path(sys.executable).parent / "orchestrator"
    assert executable.is_file()
    text = UNIT.read_text(encoding="utf-8")
    [exec_start] = re.findall(r"^ExecStart=(\S+)", text, flags=re.M)
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={exec_start}", f"ExecStart={executable}"), encoding="utf-8")
    verify = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)  # noqa: S603
    # It exits 0 on unknown keys and bad values too, and only says so: no output is the pass.
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    security = subprocess.run(  # noqa: S603 - the tool found above, on a copy of the unit
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", security.stdout)
    if security.returncode != 0 and score is None:
        pytest.skip(f"systemd-analyze security --offline is not available: {security.stderr.strip()[:200]}")
    assert score is not None, security.stdout[-500:]
    assert float(score.group(1)) <= 2.0, "hardened: 'OK' or better on systemd's 0-10 exposure scale"


# --- metrics in alerts and the dashboard ---------------------------------------------------------------


def test_alert_rules_use_only_exported_metrics_and_labels() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    expected = {"BacklogGrowing", "RequestsFailing", "Throttled", "CredentialsRefused", "NoProgress"}
    assert {f"Orchestrator{name}" for name in expected} <= set(names)
    for rule in rules:
        check_expr(rule["expr"], rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    [doc] = yaml_documents(ALERT_TESTS)
    assert doc["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        assert "interval" in test, "promtool 2.42 sees no samples without it"
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names, "each alert shown firing"
    assert quiet == names, "each alert shown not firing"


def test_dashboard_queries_use_only_exported_metrics_and_labels() -> None:
    queries = list(dashboard_queries())
    assert len(queries) > 10
    for where, expr in queries:
        check_expr(expr, where)
    covered = {exported(name) for _, expr in queries for name in metric_names(expr)}
    assert covered == set(NAMES), f"metrics on no panel: {sorted(set(NAMES) - covered)}"


def test_the_metric_checks_catch_mistakes() -> None:
    """The checks above are only worth their passes if they fail on the usual slips."""
    for expr in (
        "rate(orchestrator_request_total[5m])",  # misspelt metric
        'sum(orchestrator_backlog{status="pending"})',  # the label is `state`
        'orchestrator_backlog{state="waiting"}',  # a state that does not exist
        "sum by (reason) (rate(orchestrator_requests_total[5m]))",  # a label of another metric
        "up == 0",  # a metric the service does not export
    ):
        with pytest.raises(AssertionError):
            check_expr(expr, "mistake")
    check_expr(
        "histogram_quantile(0.9, sum by (le, endpoint) "
        '(rate(orchestrator_aep_call_duration_seconds_bucket{job=~"$job"}[5m])))',
        "fine",
    )


# --- promtool ---------------------------------------------------------------------------------------------


@pytest.fixture
def promtool() -> str:
    return require_command("promtool", "prometheus")


def run_promtool(promtool: str, *args: str) -> None:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)  # noqa: S603
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules_and_the_config(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(ALERTS))
    run_promtool(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_promtool_unit_tests_of_the_alerts(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", str(ALERT_TESTS))


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    """Grafana's variables replaced by what they stand for, each query becomes a recording rule, which
    promtool parses as PromQL."""
    rules = []
    for index, (_, expr) in enumerate(dashboard_queries()):
        query = expr.replace("$__rate_interval", "1m").replace("$job", ".+")
        rules.append({"record": f"dashboard:query_{index}", "expr": query})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    run_promtool(promtool, "check", "rules", str(path))
