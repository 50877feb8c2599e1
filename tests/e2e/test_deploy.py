"""deploy/: systemd units, the Kubernetes DaemonSet and the compose stack.

Structure and cross-references: files that mount each other exist, ports line up,
every otelwatch.toml shipped here is accepted by otelwatch's own config parser.
`systemd-analyze verify` runs when installed (it is, with systemd, on most Debian
machines; no package is added just for it); the INI checks run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from otelwatch.config import load_config, parse_config, split_listen
from tests.support.procs import REPO, require_binary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = REPO
SYSTEMD = ROOT / "deploy" / "systemd"
K8S = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yaml"


# --------------------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (keys may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{section}.{key} set {len(values)} times"
    return values[0]


def test_system_unit_keys() -> None:
    unit = parse_unit(SYSTEMD / "otelwatch.service")
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "ExecStart") == (
        "/usr/local/bin/otelwatch run --config /etc/otelwatch/config.toml")  # the default file status reads
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    # A dedicated user with exactly the two read capabilities (issue #20); CAP_KILL only in a
    # drop-in, with recovery on.
    assert one(unit, "Service", "User") == "otelwatch"
    caps = one(unit, "Service", "CapabilityBoundingSet").split()
    assert sorted(caps) == ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"]
    assert sorted(one(unit, "Service", "AmbientCapabilities").split()) == caps


def test_system_unit_hardening_keeps_what_otelwatch_needs() -> None:
    service = parse_unit(SYSTEMD / "otelwatch.service")["Service"]
    # tmux sockets live in /tmp/tmux-UID: a private /tmp hides every pane.
    assert service.get("PrivateTmp", ["no"]) == ["no"]
    # Transcripts under /home must stay readable.
    assert service.get("ProtectHome", ["no"])[0] in ("no", "read-only")
    # Other users' processes must stay visible in /proc, and /proc/stat readable.
    assert service.get("ProtectProc", ["default"])[0] == "default"
    assert service.get("ProcSubset", ["all"])[0] == "all"
    families = service["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    assert service["User"] == ["otelwatch"]  # not root: two ambient read capabilities


def test_every_risky_option_is_explained() -> None:
    text = (SYSTEMD / "otelwatch.service").read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for option in ("ProtectHome", "PrivateTmp", "ProtectProc", "ProcSubset", "NoNewPrivileges",
                   "CAP_SYS_PTRACE", "CAP_KILL", "MemoryDenyWriteExecute"):
        assert option in comments, f"no comment explains {option}"


def test_user_unit_keys() -> None:
    unit = parse_unit(SYSTEMD / "otelwatch-user.service")
    exec_start = one(unit, "Service", "ExecStart")
    assert re.fullmatch(r"\S+/otelwatch run --config \S+\.toml", exec_start)
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Install", "WantedBy") == "default.target"
    assert "User" not in unit["Service"] and "CapabilityBoundingSet" not in unit["Service"]
    assert unit["Service"].get("PrivateTmp", ["no"]) == ["no"]


def test_system_config_example_is_valid() -> None:
    cfg = load_config(SYSTEMD / "otelwatch.toml")
    unit = parse_unit(SYSTEMD / "otelwatch.service")
    assert cfg.state_dir == "/var/lib/" + one(unit, "Service", "StateDirectory")
    assert cfg.http.host == "127.0.0.1"
    assert cfg.recovery.enabled is False


def test_check_config_cli_accepts_the_example() -> None:
    proc = subprocess.run([sys.executable, "-m", "otelwatch", "check-config",
                           str(SYSTEMD / "otelwatch.toml")], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


@pytest.mark.parametrize(("name", "user"), [("otelwatch.service", False),
                                            ("otelwatch-user.service", True)])
def test_systemd_analyze_verify(tmp_path: Path, name: str, user: bool) -> None:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed; the INI checks above still ran")
    # verify insists that ExecStart's binary exists: point it at one that does.
    binary = shutil.which("otelwatch") or "/bin/true"
    text = (SYSTEMD / name).read_text()
    text = text.replace("/usr/local/bin/otelwatch", binary).replace("%h/.local/bin/otelwatch", binary)
    unit = tmp_path / name
    unit.write_text(text)
    env = dict(os.environ)
    args = [analyze, "verify", str(unit)]
    if user:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        args.insert(1, "--user")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    ours = [line for line in proc.stderr.splitlines() if str(unit) in line]
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings (exit 0): fail on them too.
    assert not ours, "\n".join(ours)


# --------------------------------------------------------------------------- kubernetes


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def k8s(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


def test_k8s_objects_well_formed() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "ConfigMap", "DaemonSet", "Service"} <= kinds
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"], d
        if d["kind"] not in ("ConfigMap", "ServiceAccount", "Namespace"):
            assert d["spec"], d["kind"]


def test_daemonset_pod_spec() -> None:
    ds = k8s("DaemonSet")
    template = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] == k8s("ServiceAccount")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        assert c["image"]
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"]
        assert res["limits"]["memory"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/healthz"
            assert get["port"] in ports or get["port"] in ports.values()
        for mount in c["volumeMounts"]:
            assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
        caps = c["securityContext"]["capabilities"]
        assert {"SYS_PTRACE", "DAC_READ_SEARCH"} <= set(caps["add"])
        assert caps["drop"] == ["ALL"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    proc_vols = [n for n, v in volumes.items() if v.get("hostPath", {}).get("path") == "/proc"]
    assert proc_vols
    mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in proc_vols]
    assert mounts and all(m.get("readOnly") is True for m in mounts)
    for name, vol in volumes.items():
        if "configMap" in vol:
            assert vol["configMap"]["name"] == k8s("ConfigMap")["metadata"]["name"], name


def test_k8s_config_listens_where_it_is_scraped() -> None:
    data = tomllib.loads(k8s("ConfigMap")["data"]["otelwatch.toml"])
    cfg = parse_config(data)
    host, port = split_listen(cfg.http.listen)
    assert host == "0.0.0.0"  # reachable by Prometheus; see the comment in the manifest
    ds = k8s("DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    # args name the file the ConfigMap is mounted as
    config_path = container["args"][container["args"].index("--config") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert config_path == f"{mount['mountPath']}/otelwatch.toml"
    assert cfg.recovery.enabled is False


def test_k8s_service_selects_the_pods() -> None:
    svc = k8s("Service")
    pod_labels = k8s("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (container,) = k8s("DaemonSet")["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in names


# --------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def host_port(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"(?:\w+://)?([\w.-]+):(\d+)/?", url)
    assert m, url
    return m.group(1), int(m.group(2))


def test_compose_services() -> None:
    services = compose()["services"]
    assert {"otelwatch", "otelcol", "prometheus", "grafana", "tempo"} <= set(services)
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert services["otelwatch"]["pid"] == "host"
    assert services["otelcol"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"published beyond loopback: {port}"


def bind_mounts() -> list[tuple[str, Path, str]]:
    out = []
    declared = set(compose().get("volumes") or {})
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source in declared or source in ("/home", "/root"):  # named volumes; the host's homes
                continue
            out.append((name, (COMPOSE_DIR / source).resolve(), target))
    return out


def test_every_mounted_file_exists() -> None:
    mounts = bind_mounts()
    assert len(mounts) >= 7
    for service, source, _ in mounts:
        assert source.exists(), f"{service}: {source} does not exist"
        assert ROOT in source.parents, f"{service}: {source} is outside the repository"


def test_dockerfile_copies_existing_paths() -> None:
    build = compose()["services"]["otelwatch"]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == ROOT
    dockerfile = context / build["dockerfile"]
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (context / src).exists(), src


def mount_target(service: str, source: str) -> str:
    """Where `service` mounts the repository path `source`."""
    (target,) = [t for s, src, t in bind_mounts() if s == service and src == ROOT / source]
    return target


def test_compose_otelwatch_config_and_ports() -> None:
    svc = compose()["services"]["otelwatch"]
    target = mount_target("otelwatch", "deploy/compose/otelwatch.toml")
    assert svc["command"][svc["command"].index("--config") + 1] == target
    cfg = load_config(COMPOSE_DIR / "otelwatch.toml")
    _, listen_port = split_listen(cfg.http.listen)
    published = [int(str(p).split(":")[-1]) for p in svc["ports"]]
    assert listen_port in published
    assert cfg.export.otlp.enabled is True
    # otelwatch -> collector: the endpoint names the collector service and its grpc port.
    host, port = host_port(svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "otelcol"
    collector = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    assert port == int(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])


def test_collector_overrides_name_existing_keys() -> None:
    collector = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    svc = compose()["services"]["otelcol"]
    overrides = [a.split("=", 1)[1] for a in svc["command"] if a.startswith("--config=yaml:")]
    assert len(overrides) == 3
    for override in overrides:
        path, _, value = override[len("yaml:"):].partition(": ")
        node: Any = collector
        for key in path.split("::"):
            assert key in node, f"override of a key the config does not have: {path}"
            node = node[key]
        assert node.rsplit(":", 1)[1] == value.rsplit(":", 1)[1], "override changes the port"
        assert value.startswith("0.0.0.0:")
    assert mount_target("otelcol", "collector-config.yaml") == svc["command"][0].split("=", 1)[1]


def test_prometheus_rules_and_targets_line_up() -> None:
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert mount_target("prometheus", "deploy/prometheus/otelwatch-alerts.yaml") in prom["rule_files"]
    services = compose()["services"]
    collector = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    exporter_port = int(collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1])
    for job in prom["scrape_configs"]:
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                host, port = host_port(target)
                if host == "localhost":
                    continue
                assert host in services, target
                if host == "otelcol":
                    assert port == exporter_port
                    assert job["honor_labels"] is True  # keep job/instance from OTLP resources


def test_promtool_accepts_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    rules = tmp_path / "otelwatch-alerts.yaml"
    shutil.copy(ROOT / "deploy" / "prometheus" / "otelwatch-alerts.yaml", rules)
    text = (COMPOSE_DIR / "prometheus.yml").read_text()
    text = text.replace(mount_target("prometheus", "deploy/prometheus/otelwatch-alerts.yaml"), str(rules))
    (tmp_path / "prometheus.yml").write_text(text)
    proc = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Loaded, not merely parsed: an empty rule file passes `check config` too.
    n = sum(len(g["rules"]) for g in yaml.safe_load(rules.read_text())["groups"])
    assert n > 0 and f"SUCCESS: {n} rules found" in proc.stdout, proc.stdout


def test_grafana_provisioning_lines_up() -> None:
    services = compose()["services"]
    ds = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/datasources.yaml").read_text())
    by_type = {d["type"]: d for d in ds["datasources"]}
    host, port = host_port(by_type["prometheus"]["url"])
    assert host == "prometheus" and host in services and port == 9090
    assert by_type["prometheus"]["isDefault"] is True  # what ${datasource} picks first
    host, port = host_port(by_type["tempo"]["url"])
    tempo = yaml.safe_load((COMPOSE_DIR / "tempo.yaml").read_text())
    assert host == "tempo" and port == tempo["server"]["http_listen_port"]
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/otelwatch.yaml").read_text())
    (prov,) = provider["providers"]
    assert prov["options"]["path"] == mount_target("grafana", "dashboards")
    assert (ROOT / "dashboards" / "otelwatch-fleet.json").exists()


def test_traces_reach_tempo() -> None:
    collector = yaml.safe_load((ROOT / "collector-config.yaml").read_text())
    tempo = yaml.safe_load((COMPOSE_DIR / "tempo.yaml").read_text())
    host, port = host_port(collector["exporters"]["otlp/traces"]["endpoint"])
    assert host == "tempo" and host in compose()["services"]
    grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert int(grpc.rsplit(":", 1)[1]) == port


def test_sysusers_snippet_creates_the_units_user() -> None:
    unit = parse_unit(SYSTEMD / "otelwatch.service")
    lines = [ln.split() for ln in (SYSTEMD / "otelwatch.sysusers").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert [ln[:2] for ln in lines] == [["u", one(unit, "Service", "User")]]


def test_containers_see_the_hosts_homes_and_keep_transcripts_on() -> None:
    """Issue #20: with transcripts off (or homes unmounted) every interactive agent is blind."""
    ds = k8s("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    (container,) = pod["containers"]
    mounted = {host_paths[m["name"]]: m for m in container["volumeMounts"] if m["name"] in host_paths}
    for home in ("/home", "/root"):
        assert mounted[home]["mountPath"] == home and mounted[home]["readOnly"] is True
    assert parse_config(tomllib.loads(k8s("ConfigMap")["data"]["otelwatch.toml"])).sources.transcripts.enabled
    volumes = compose()["services"]["otelwatch"]["volumes"]
    assert "/home:/home:ro" in volumes and "/root:/root:ro" in volumes
    assert load_config(COMPOSE_DIR / "otelwatch.toml").sources.transcripts.enabled
