"""The deployment files (deploy/container, deploy/kubernetes) agree with the code.

They cannot run here (no container engine, no cluster), so these checks keep them honest: every
``PIPELINE_*`` name is a real setting, every environment loads the settings, every ``pipeline``
command parses, ports match the settings, the autoscaler stays within the partitions, and the
kustomization lists every manifest.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import typer.main
import yaml
from pydantic import BaseModel

from pipeline.cli import app
from pipeline.settings import Settings
from pipeline.workbench_process import streamlit_options

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PREFIX = "PIPELINE_"
PLACEHOLDER = "REPLACE_ME"

Manifest = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[Manifest]:
    docs: list[Manifest] = []
    for path in _manifest_files():
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


def _of_kind(kind: str) -> list[Manifest]:
    return [doc for doc in _documents() if doc["kind"] == kind]


def _named(kind: str, name: str) -> Manifest:
    found = [doc for doc in _of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Container:
    """One container of a Deployment or StatefulSet, with its pod spec and pod labels."""

    workload: Manifest
    pod: Manifest
    spec: Manifest

    @property
    def id(self) -> str:
        return f"{self.workload['metadata']['name']}/{self.spec['name']}"

    @property
    def ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.spec.get("ports", [])}


def _containers() -> list[Container]:
    found: list[Container] = []
    for doc in _documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]
            found.extend(Container(doc, pod, c) for c in pod["spec"]["containers"])
    return found


@dataclass(frozen=True)
class Containerfile:
    """The final stage of deploy/container/Containerfile, as far as these checks need it."""

    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    expose: set[int]
    copies: dict[str, str]
    sources: list[str]


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


def _containerfile() -> Containerfile:
    instructions = list(_instructions(CONTAINERFILE.read_text()))
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    sources = [  # what every stage copies from the build context
        src
        for keyword, rest in instructions
        if keyword == "COPY" and not rest.startswith("--from")
        for src in rest.split()[:-1]
    ]
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    expose: set[int] = set()
    copies: dict[str, str] = {}
    for keyword, rest in instructions[last_from:]:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif keyword == "CMD":
            cmd = json.loads(rest)
        elif keyword == "EXPOSE":
            expose = {int(port) for port in rest.split()}
        elif keyword == "COPY" and not rest.startswith("--from"):
            src, dest = rest.split()
            copies[dest.rstrip("/") + "/"] = src.rstrip("/") + "/"
    return Containerfile(env, entrypoint, cmd, expose, copies, sources)


def _repo_path_in_image(image_path: str | Path) -> Path:
    """The repository file that the image holds at ``image_path`` (via a COPY)."""
    path = str(image_path)
    for dest, src in _containerfile().copies.items():
        if path.startswith(dest):
            return REPO / src / path.removeprefix(dest)
    raise AssertionError(f"{path} is not copied into the image by any COPY")


def _setting_exists(variable: str) -> bool:
    """True when ``PIPELINE_A__B`` names a settings field (nested with ``__``, any case)."""
    model: type[BaseModel] | None = Settings
    for part in variable.removeprefix(PREFIX).lower().split("__"):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_model else None
    return True


def _deploy_texts() -> dict[str, str]:
    files = [*_manifest_files(), K8S / "kustomization.yaml", CONTAINERFILE]
    return {str(p.relative_to(REPO)): p.read_text() for p in files}


def test_every_pipeline_variable_names_a_setting() -> None:
    # Comments included: a renamed setting must not survive in the instructions either.
    unknown: dict[str, set[str]] = {}
    seen: set[str] = set()
    for name, text in _deploy_texts().items():
        for variable in re.findall(rf"\b{PREFIX}[A-Z0-9_]*[A-Z0-9]", text):
            seen.add(variable)
            if not _setting_exists(variable):
                unknown.setdefault(name, set()).add(variable)
    assert len(seen) >= 10, f"too few PIPELINE_ variables found to be a real check: {seen}"
    assert not unknown, f"not settings fields: {unknown}"


def test_setting_name_check_rejects_unknown_and_too_deep_names() -> None:
    assert _setting_exists("PIPELINE_BIGQUERY__ENABLED")
    assert _setting_exists("PIPELINE_collector__write_keys")
    assert not _setting_exists("PIPELINE_BIGQUERY__ENABLE")
    assert not _setting_exists("PIPELINE_PARTITIONS__COUNT")
    assert not _setting_exists("PIPELINE_BROKERS")


def _container_env(container: Container) -> dict[str, str]:
    """The PIPELINE_ variables the container sees: image ENV, then envFrom, then env."""
    env = {k: v for k, v in _containerfile().env.items() if k.startswith(PREFIX)}
    for source in container.spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_named("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(_named("Secret", source["secretRef"]["name"])["stringData"])
    pod_name = f"{container.workload['metadata']['name']}-0"
    for item in container.spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
    return {k: v for k, v in env.items() if k.startswith(PREFIX)}


def _settings_for(
    container: Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    monkeypatch.chdir(tmp_path)  # no stray .env is read
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, value in _container_env(container).items():
        monkeypatch.setenv(name, value)
    return Settings()


CONTAINERS = _containers()


def test_every_role_is_deployed() -> None:
    names = {c.workload["metadata"]["name"] for c in CONTAINERS}
    expected = {
        "pipeline-processor",
        "pipeline-collector",
        "pipeline-api",
        "pipeline-workbench",
        "pipeline-delivery",
    }
    assert names == expected


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: c.id)
def test_container_environment_loads_the_settings(
    container: Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _settings_for(container, monkeypatch, tmp_path)
    assert settings.broker, "the deployment must use the external cluster, not the embedded one"
    assert settings.catalog_path.is_absolute()
    assert _repo_path_in_image(settings.catalog_path).is_file()
    assert settings.sync.crm_csv_path is not None
    assert _repo_path_in_image(settings.sync.crm_csv_path).is_file()
    mounts = {m["mountPath"] for m in container.spec.get("volumeMounts", [])}
    assert str(settings.home) in mounts, "PIPELINE_HOME must be a mounted (writable) volume"


def _pipeline_argv(container: Container) -> list[str] | None:
    """The pipeline CLI arguments the container runs, or None when it runs another program."""
    image = _containerfile()
    command = container.spec.get("command", image.entrypoint)
    args = container.spec.get("args", image.cmd if "command" not in container.spec else [])
    if command[0] != "pipeline":
        return None
    return [*command[1:], *args]


def _is_follower(container: Container) -> bool:
    """A `pipeline follow` container (a copy of the store, with the trigger scan or not)."""
    argv = _pipeline_argv(container)
    return argv is not None and argv[:1] == ["follow"]


def _home_mount(container: Container, home: str) -> str | None:
    """The volume mounted at the pipeline home in ``container``, if any."""
    mounts = container.spec.get("volumeMounts", [])
    return next((m["name"] for m in mounts if m["mountPath"] == home), None)


@pytest.mark.parametrize("name", ["pipeline-api", "pipeline-workbench"])
def test_readers_of_the_store_keep_their_own_copy_from_the_topics(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # their pods do not share the processor pods' volumes: without a copy they serve nothing
    pod = [c for c in CONTAINERS if c.workload["metadata"]["name"] == name]
    main = next(c for c in pod if not _is_follower(c))
    argv = _pipeline_argv(main)
    if argv is not None and argv[0] == "api" and "--follow" in argv:
        return
    home = str(_settings_for(main, monkeypatch, tmp_path).home)
    followers = [c for c in pod if _is_follower(c)]
    assert followers, f"{name} has no `pipeline follow` container and no --follow"
    volume = _home_mount(main, home)
    assert volume is not None, f"{main.id} does not mount the pipeline home {home}"
    assert all(_home_mount(f, home) == volume for f in followers), "not the same home volume"


def _check_cli(argv: list[str]) -> None:
    """Parse ``pipeline ARGV`` as the CLI would (options and their types), without running it."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    parent = group.make_context("pipeline", list(argv))
    name, *rest = argv
    command = group.get_command(parent, name)
    assert command is not None, f"`pipeline {name}` is not a command"
    command.make_context(name, rest, parent=parent)


def test_image_entrypoint_and_default_command_are_the_cli() -> None:
    image = _containerfile()
    assert image.entrypoint == ["pipeline"]
    _check_cli(image.cmd)


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: c.id)
def test_container_command_is_a_real_cli_command(container: Container) -> None:
    argv = _pipeline_argv(container)
    if argv is None:
        command = container.spec["command"]
        assert command == ["streamlit"], f"{container.id}: unexpected program {command}"
        app_path = container.spec["args"][1]
        assert container.spec["args"][0] == "run"
        assert _repo_path_in_image(app_path).is_file()
        return
    _check_cli(argv)


def test_cli_check_rejects_unknown_commands_and_options() -> None:
    with pytest.raises(AssertionError):
        _check_cli(["processor"])
    # typer's usage errors (unknown option, wrong type) are TyperExceptions
    with pytest.raises(typer.TyperException, match="no-processor"):
        _check_cli(["up", "--no-processor"])
    with pytest.raises(typer.BadParameter):
        _check_cli(["api", "--port", "http"])


def _expected_port(name: str, settings: Settings) -> int:
    ports = {
        "pipeline-processor": settings.metrics_port,
        "pipeline-collector": settings.collector.port,
        "pipeline-api": settings.api.port,
        "pipeline-workbench": settings.workbench_port,
    }
    return ports[name]


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: c.id)
def test_container_ports_match_the_settings(
    container: Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if _is_follower(container):  # a sidecar keeping the store: serves nothing
        assert container.ports == {}
        return
    settings = _settings_for(container, monkeypatch, tmp_path)
    expected = _expected_port(container.workload["metadata"]["name"], settings)
    assert list(container.ports.values()) == [expected]
    args = container.spec.get("args", [])
    if "--server.port" in args:
        assert int(args[args.index("--server.port") + 1]) == expected
    annotations = container.pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container.spec:
            port = container.spec[probe]["httpGet"]["port"]
            assert port in container.ports, f"{container.id} {probe} uses unknown port {port}"


def test_image_exposes_the_default_ports() -> None:
    defaults = Settings.model_construct()
    expected = {
        defaults.metrics_port,
        defaults.workbench_port,
        defaults.collector.port,
        defaults.api.port,
    }
    assert _containerfile().expose == expected


def _selected(selector: dict[str, str]) -> list[Container]:
    return [c for c in CONTAINERS if selector.items() <= c.pod["metadata"]["labels"].items()]


def test_services_select_pods_and_target_their_ports() -> None:
    services = _of_kind("Service")
    assert services
    for service in services:
        pods = _selected(service["spec"]["selector"])
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            assert all(port["targetPort"] in c.ports for c in pods if not _is_follower(c))


def _processor() -> Container:
    (container,) = [c for c in CONTAINERS if c.workload["metadata"]["name"] == "pipeline-processor"]
    return container


def test_processor_is_a_statefulset_with_stable_instance_ids_and_state_volume() -> None:
    processor = _processor()
    env = {item["name"]: item for item in processor.spec["env"]}
    field = env["PIPELINE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.name"
    claims = {t["metadata"]["name"] for t in processor.workload["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in processor.spec["volumeMounts"]}
    assert mounts.keys() & claims, "the state directory must be on a volume claim"
    assert "replicas" not in processor.workload["spec"], "KEDA owns the replica count"
    (pdb,) = _of_kind("PodDisruptionBudget")
    assert _selected(pdb["spec"]["selector"]["matchLabels"]) == [processor]


def test_autoscaler_stays_within_partitions_and_watches_the_processor_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    processor = _processor()
    settings = _settings_for(processor, monkeypatch, tmp_path)
    (scaled,) = _of_kind("ScaledObject")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        processor.workload["kind"],
        processor.workload["metadata"]["name"],
    )
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= settings.partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == settings.consumer_group
    assert meta["topic"] == settings.topics.raw
    assert meta["bootstrapServers"] == settings.broker
    assert int(meta["lagThreshold"]) > 0
    auth = _named("TriggerAuthentication", trigger["authenticationRef"]["name"])
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in _named("Secret", ref["name"])["stringData"]


def test_the_trigger_scan_runs_once_on_a_copy_of_every_partition() -> None:
    """Each processor pod holds its own partitions (stale ones too, after a rebalance): the
    scan and delivery run in one pod on a copy of them all, on a volume (scheduled e-mails)."""
    assert "--no-triggers" in (_pipeline_argv(_processor()) or [])
    (delivery,) = [c for c in CONTAINERS if c.workload["metadata"]["name"] == "pipeline-delivery"]
    assert _pipeline_argv(delivery) == ["follow", "--triggers"]
    _check_cli(["follow", "--triggers"])
    assert delivery.workload["kind"] == "StatefulSet" and delivery.workload["spec"]["replicas"] == 1
    claims = {t["metadata"]["name"] for t in delivery.workload["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in delivery.spec["volumeMounts"]} & claims


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in _manifest_files()}


def test_example_secrets_hold_only_placeholders() -> None:
    secrets = _of_kind("Secret")
    assert secrets
    for secret in secrets:
        for key, value in secret["stringData"].items():
            if not re.search(r"password|secret|key|username", key, re.IGNORECASE):
                continue
            values = json.loads(value).values() if value.startswith("{") else [value]
            for item in values:
                assert PLACEHOLDER in item, f"{key} in {secret['metadata']['name']}: not fake"


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p.removeprefix("**/")) for p in patterns)


def test_dockerignore_keeps_local_state_out_and_the_copied_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".git", ".venv", ".pipeline", "node_modules", "reports", ".env"):
        assert _ignored(heavy, patterns), f"{heavy} is sent in the build context"
    sources = _containerfile().sources
    assert {"pyproject.toml", "src", "sample_data/"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: missing"
        assert not _ignored(src.rstrip("/"), patterns), f"COPY {src}: excluded by .dockerignore"


def _probe_paths(container: Container) -> set[str]:
    return {
        container.spec[probe]["httpGet"]["path"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe")
        if "httpGet" in container.spec.get(probe, {})
    }


def test_every_http_probe_of_the_collector_and_the_api_is_a_route_they_serve(
    tmp_path: Path,
) -> None:
    """A probe on a path the app does not serve fails forever: the pod never gets ready, or
    is restarted in a loop. The collector's liveness must not be its readiness (a broker
    outage would restart every collector)."""
    from pipeline.api.app import create_app as create_api
    from pipeline.collector.app import create_app as create_collector
    from pipeline.collector.publish import MemoryPublisher

    settings = Settings(home=tmp_path)
    apps = {
        "pipeline-collector/collector": create_collector(settings, MemoryPublisher),
        "pipeline-api/api": create_api(settings),
    }
    probed = {c.id: _probe_paths(c) for c in _containers() if c.id in apps}
    assert set(probed) == set(apps), probed
    for name, served in apps.items():
        routes = {getattr(route, "path", None) for route in served.routes}
        assert probed[name] and probed[name] <= routes, (name, probed[name])
    collector = next(c for c in _containers() if c.id == "pipeline-collector/collector")
    assert collector.spec["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert collector.spec["readinessProbe"]["httpGet"]["path"] == "/health"


def test_the_workbench_pod_runs_streamlit_with_the_options_of_pipeline_up() -> None:
    """The same `streamlit run` options as `pipeline up` (table CSV export off, among them),
    but for the address and port a pod listens on."""
    [workbench] = [c for c in _containers() if c.spec["name"] == "workbench"]
    args = workbench.spec["args"]
    deployed = dict(zip(args[2::2], args[3::2], strict=True))
    local = streamlit_options(Settings())
    expected = dict(zip(local[::2], local[1::2], strict=True))
    for listen in ("--server.address", "--server.port"):
        deployed.pop(listen), expected.pop(listen)
    assert deployed == expected
    assert expected["--client.disableDataExport"] == "true"
