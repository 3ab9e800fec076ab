"""Static checks of docker-compose.yml, the Dockerfile and .dockerignore (no Docker engine).

The compose file is parsed with PyYAML (a dev dependency); when the
``docker-compose`` tool (v1, Debian package ``docker-compose``) or the ``docker compose``
plugin is installed, ``config -q`` validates the file against the Compose schema too: it
needs no engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stream.app import topic_plan
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ONE_SHOT = {"kafka-init", "replay", "pretrain"}
DEFAULT_RE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _default(value: object) -> str:
    """Resolve ``${VAR:-default}`` to its default, as compose does with VAR unset."""
    return DEFAULT_RE.sub(lambda m: m.group(2), str(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    import yaml  # the dev extra

    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_compose_specification_without_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose
    assert set(compose["services"]) >= {
        "kafka", "kafka-init", "joiner", "trainer", "trainer-gpu", "serve", "serve-lb",
        "prometheus", "grafana", "replay", "pretrain",
    }  # fmt: skip


def test_every_service_declares_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc, f"{name} has no healthcheck"
        if name in ONE_SHOT:
            # one-shot jobs disable the check explicitly (the streamrec image's HEALTHCHECK
            # probes the worker's /metrics, which replay and pretrain do not serve)
            assert hc == {"disable": True}, name
        else:
            assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
            assert "interval" in hc and "retries" in hc, name


def test_kafka_is_single_node_kraft_with_a_volume(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "kafka-data:/var/lib/kafka/data" in kafka["volumes"]
    assert "kafka-data" in compose["volumes"]
    test = " ".join(kafka["healthcheck"]["test"])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server localhost:9092" in test


def test_depends_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    def cond(svc: str, dep: str) -> str:
        return str(services[svc]["depends_on"][dep]["condition"])

    assert cond("kafka-init", "kafka") == "service_healthy"
    for svc in ("joiner", "trainer", "trainer-gpu", "serve", "replay"):
        assert cond(svc, "kafka-init") == "service_completed_successfully", svc
    assert "prometheus" in services["grafana"]["depends_on"]
    assert "serve" in services["serve-lb"]["depends_on"]


def test_published_ports_are_bound_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published += 1
    assert published >= 3
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]


def test_workers_scale_no_fixed_host_port(services: dict[str, dict[str, Any]]) -> None:
    for name in ("joiner", "trainer", "trainer-gpu", "serve"):
        svc = services[name]
        assert "ports" not in svc and "container_name" not in svc, name
        assert [str(p) for p in svc["expose"]][0] == "9464", name
    for name in ("trainer", "trainer-gpu", "serve"):  # /recommend inside the network
        assert "6066" in [str(p) for p in services[name]["expose"]], name


def test_grafana_has_no_default_password(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    pw = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", pw), pw
    assert "admin" not in pw.lower().replace("grafana_admin_password", "")
    assert grafana["image"].startswith("grafana/grafana")
    vols = grafana["volumes"]
    assert any(v.startswith("./monitoring/grafana/provisioning:/etc/grafana/provisioning")
               for v in vols)  # fmt: skip
    assert any(v.startswith("./monitoring/grafana/dashboards:/var/lib/grafana/dashboards")
               for v in vols)  # fmt: skip


def test_worker_environment_points_at_kafka(services: dict[str, dict[str, Any]]) -> None:
    for name in ("joiner", "trainer", "trainer-gpu", "serve"):
        env = services[name]["environment"]
        assert env["STREAMREC_BROKER"] == "kafka:9092", name
        assert env["STREAMREC_METRICS_HOST"] == "0.0.0.0", name
        assert str(env["STREAMREC_METRICS_PORT"]) == "9464", name
        assert "build" in services[name], name
    gpu = services["trainer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_topic_creation_covers_the_topic_plan(services: dict[str, dict[str, Any]]) -> None:
    init = services["kafka-init"]
    assert init["image"] == "apache/kafka:3.9.0"
    script = " ".join(init.get("entrypoint", [])) + " " + " ".join(init["command"])
    assert "kafka-topics.sh" in script
    created: dict[str, int] = {}
    for line in script.splitlines():
        m = re.search(r"--topic\s+(\S+)\s+--partitions\s+(\S+)", line)
        if m:
            created[m.group(1)] = int(_default(m.group(2)))
    assert created == topic_plan(Settings())
    # impressions/clicks follow STREAMREC_PARTITIONS, as the worker's settings do
    assert script.count("--partitions ${STREAMREC_PARTITIONS:-4}") == 3
    assert services["joiner"]["environment"]["STREAMREC_PARTITIONS"] == "${STREAMREC_PARTITIONS:-4}"
    dead = next(ln for ln in script.splitlines() if "--topic dead-letter" in ln)
    assert "retention.ms=604800000" in dead  # 7 days
    # control is read from the beginning, not compacted; only the join-state changelog is
    (compacted,) = [line for line in script.splitlines() if "compact" in line]
    assert "--topic streamrec-join-state-changelog" in compacted


def test_replay_and_pretrain_profiles(services: dict[str, dict[str, Any]]) -> None:
    replay = services["replay"]
    assert replay["profiles"] == ["replay"]
    assert replay["command"] == [
        "replay", "/data/log.csv.gz", "--broker", "kafka:9092", "--no-create-topics",
    ]  # fmt: skip
    assert "${REPLAY_LOG:-./runs/log.csv.gz}:/data/log.csv.gz:ro" in replay["volumes"]
    pretrain = services["pretrain"]
    assert pretrain["profiles"] == ["pretrain"]
    assert pretrain["command"] == ["pretrain", "/data/log.csv.gz", "--out", "/models/pretrain.pt"]
    assert "models:/models" in pretrain["volumes"]
    assert replay["image"] == services["trainer"]["image"] == pretrain["image"]


def test_bind_mount_sources_in_the_repository_exist(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = _default(vol.split(":", 1)[0])
            if not src.startswith("./") or src.startswith("./runs/"):
                continue  # named volumes, and run-time artefacts (the replay log)
            assert (ROOT / src).exists(), f"{name}: {src} does not exist"
            checked += 1
    assert checked >= 3
    assert (ROOT / "monitoring/prometheus/prometheus.yml").is_file()
    assert (ROOT / "monitoring/prometheus/alerts.yml").is_file()
    import yaml

    prom_cfg = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    sd = prom_cfg["scrape_configs"][0]["dns_sd_configs"][0]
    # every replica of every role (--scale joiner=N), on the port the image exposes; the
    # GPU trainer is scraped too
    assert sd["names"] == ["joiner", "trainer", "trainer-gpu", "serve"] and sd["port"] == 9464
    assert set(sd["names"]) <= set(services) and "9464" in (ROOT / "Dockerfile").read_text()
    prom = services["prometheus"]
    assert "./monitoring/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert prom["image"].startswith("prom/prometheus")


# ----------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Instructions, one per item, continuation lines joined, comments dropped."""
    out: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return out


def _index(lines: list[str], pred: Any) -> int:
    return next(i for i, ln in enumerate(lines) if pred(ln))


def test_dockerfile_base_user_entrypoint(dockerfile: list[str]) -> None:
    assert dockerfile[0] == "FROM python:3.11-slim"
    users = [ln.split()[1] for ln in dockerfile if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert 'ENTRYPOINT ["streamrec"]' in dockerfile
    assert 'CMD ["worker"]' in dockerfile
    assert "EXPOSE 9464" in dockerfile


def test_dockerfile_installs_torch_before_the_project(dockerfile: list[str]) -> None:
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    torch = _index(dockerfile, lambda ln: "torch==" in ln and "pip install" in ln)
    assert '--index-url "${TORCH_INDEX}"' in dockerfile[torch]
    pyproject = _index(dockerfile, lambda ln: ln.startswith("COPY pyproject.toml"))
    deps = _index(dockerfile, lambda ln: "pip install -r" in ln)
    source = _index(dockerfile, lambda ln: ln.startswith("COPY stream"))
    project = _index(dockerfile, lambda ln: "pip install --no-deps ." in ln)
    assert torch < pyproject < deps < source < project
    user = _index(dockerfile, lambda ln: ln.startswith("USER "))
    assert project < user  # installed as root, run as the unprivileged user


def test_dockerfile_healthcheck_fetches_metrics(dockerfile: list[str]) -> None:
    (hc,) = [ln for ln in dockerfile if ln.startswith("HEALTHCHECK")]
    assert "urllib.request" in hc and "http://127.0.0.1:" in hc and "/metrics" in hc


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", ".env"} <= ignored


# ----------------------------------------------------------------------------- compose CLIs


def _compose_commands() -> list[list[str]]:
    cmds = []
    if shutil.which("docker-compose"):
        cmds.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            cmds.append(["docker", "compose"])
    return cmds


@pytest.mark.parametrize("tool", _compose_commands() or [None], ids=lambda t: " ".join(t or []))
def test_compose_config_validates_without_an_engine(tool: list[str] | None,
                                                    tmp_path: Path) -> None:  # fmt: skip
    if tool is None:
        pytest.fail(
            "neither docker-compose nor the docker compose plugin is installed: "
            "apt-get install -y docker-compose (make system-deps does it)"
        )
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    base = [*tool, "--env-file", str(empty_env), "-f", str(COMPOSE),
            "--profile", "gpu", "--profile", "replay", "--profile", "pretrain"]  # fmt: skip
    ok = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, cwd=ROOT,
                        env={**env, "GRAFANA_ADMIN_PASSWORD": "test-only"}, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    # no default Grafana credentials: without the variable the file does not resolve
    missing = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, cwd=ROOT,
                             env=env, timeout=60)  # fmt: skip
    assert missing.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in missing.stderr + missing.stdout


# ----------------------------------------------------------------------------- roles


def test_roles_share_the_model_store_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert "models" in compose["volumes"]
    for name in ("trainer", "trainer-gpu"):
        assert "models:/models" in services[name]["volumes"], name
    assert "models:/models:ro" in services["serve"]["volumes"]  # replicas only read
    assert "volumes" not in services["joiner"]
    for name in ("joiner", "trainer", "trainer-gpu", "serve"):
        assert services[name]["environment"]["STREAMREC_MODEL_STORE"] == "/models/store"
    assert services["joiner"]["command"] == ["worker", "--role", "joiner"]
    assert services["serve"]["command"] == ["worker", "--role", "serve"]
    assert "/health" in " ".join(services["serve"]["healthcheck"]["test"])
    # on shared cores the replicas (default weight 1024) get the CPU before the trainer
    for name in ("trainer", "trainer-gpu"):
        assert services[name]["cpu_shares"] < 1024, name
    assert "cpu_shares" not in services["serve"]


def test_trainer_warm_starts_from_pretrain_only_when_it_exists(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("trainer", "trainer-gpu"):
        svc = services[name]
        assert svc["entrypoint"] == ["/bin/sh", "-c"], name
        (script,) = svc["command"]
        assert "--role trainer --warm-start /models/pretrain.pt" in script
        assert "[ -f /models/pretrain.pt ]" in script and "exec streamrec worker" in script
    assert "/models/pretrain.pt" in services["pretrain"]["command"]


def test_every_long_running_container_is_non_root(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        user = str(svc.get("user", ""))
        assert user and user.split(":")[0] not in ("root", "0"), name


def test_serving_replicas_sit_behind_one_loopback_port(
    services: dict[str, dict[str, Any]],
) -> None:
    lb = services["serve-lb"]
    assert lb["ports"] == ["127.0.0.1:${SERVE_PORT:-6066}:8080"]
    assert "unprivileged" in lb["image"]
    (conf_mount,) = lb["volumes"]
    conf = (ROOT / conf_mount.split(":")[0]).read_text()
    # resolved at run time through compose's DNS (every replica), retried on the next one
    assert "resolver 127.0.0.11" in conf and "set $serve_upstream serve;" in conf
    assert "proxy_pass http://$serve_upstream:6066;" in conf
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in conf
    assert "listen 8080;" in conf


# ----------------------------------------------------------------------------- SASL / ACLs

SASL = ROOT / "docker-compose.sasl.yml"
SASL_SECRETS = {
    "KAFKA_ADMIN_PASSWORD": "adm-test",
    "STREAMREC_KAFKA_PASSWORD": "sr-test",
    "KAFKA_PRODUCER_PASSWORD": "prod-test",
    "GRAFANA_ADMIN_PASSWORD": "g-test",
}


def _sasl_config(tool: list[str], tmp_path: Path, env: dict[str, str]) -> Any:
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in SASL_SECRETS}
    return subprocess.run(
        [*tool, "--env-file", str(empty_env), "-f", str(COMPOSE), "-f", str(SASL),
         "--profile", "gpu", "--profile", "replay", "config"],
        capture_output=True, text=True, cwd=ROOT, env={**base, **env}, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("tool", _compose_commands() or [None], ids=lambda t: " ".join(t or []))
def test_sasl_override_validates_and_needs_every_password(
    tool: list[str] | None, tmp_path: Path
) -> None:
    if tool is None:
        pytest.fail("neither docker-compose nor the docker compose plugin is installed")
    import yaml

    ok = _sasl_config(tool, tmp_path, SASL_SECRETS)
    assert ok.returncode == 0, ok.stderr
    merged = yaml.safe_load(ok.stdout)["services"]
    kafka = merged["kafka"]["environment"]
    # every listener authenticates; nothing is allowed without an ACL
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert "StandardAuthorizer" in kafka["KAFKA_AUTHORIZER_CLASS_NAME"]
    for listener in protocols:
        jaas = kafka[f"KAFKA_LISTENER_NAME_{listener}_PLAIN_SASL_JAAS_CONFIG"]
        assert 'user_streamrec="sr-test"' in jaas and 'user_producer="prod-test"' in jaas
    # the workers authenticate as streamrec; the settings they build accept it
    for name in ("joiner", "trainer", "trainer-gpu", "serve", "replay"):
        env = merged[name]["environment"]
        assert env["STREAMREC_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        assert env["STREAMREC_KAFKA_SASL_PASSWORD"] == "sr-test"
        assert env["STREAMREC_BROKER"] == "kafka:9092"  # the base file's, merged
    # producers may write the inputs only: never control, labeled or scored
    init = "\n".join(merged["kafka-init"]["command"])
    producer_acls = [ln for ln in init.splitlines() if "User:producer" in ln]
    assert producer_acls and all("--operation Write" in ln for ln in producer_acls)
    assert "for topic in impressions clicks; do" in init
    assert "--command-config /tmp/admin.properties" in init
    for name in ("KAFKA_ADMIN_PASSWORD", "STREAMREC_KAFKA_PASSWORD", "KAFKA_PRODUCER_PASSWORD"):
        missing = _sasl_config(tool, tmp_path, {k: v for k, v in SASL_SECRETS.items() if k != name})
        assert missing.returncode != 0 and name in missing.stderr + missing.stdout


def test_settings_from_the_sasl_environment_hide_the_password() -> None:
    from stream.settings import load_settings

    env = {"STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "STREAMREC_KAFKA_SASL_USERNAME": "streamrec",
           "STREAMREC_KAFKA_SASL_PASSWORD": "sr-test"}  # fmt: skip
    s = load_settings(env=env)
    assert s.kafka_client_options() == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "streamrec", "sasl_plain_password": "sr-test",
    }  # fmt: skip
    assert "sr-test" not in repr(s)
    creds = s.faust_credentials()
    assert (creds.username, creds.mechanism.value, creds.protocol.value) == (
        "streamrec", "PLAIN", "SASL_PLAINTEXT")  # fmt: skip
    assert Settings().kafka_client_options() == {} and Settings().faust_credentials() is None
    with pytest.raises(ValueError, match="STREAMREC_KAFKA_SASL_USERNAME"):
        load_settings(env={"STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        Settings(kafka_security_protocol="SSL_PLAIN")
