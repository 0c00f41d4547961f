"""The Helm chart, linted and rendered offline in-process by helm-python-sdk (Helm's own Go
code, no helm binary, no cluster), each manifest validated against the Kubernetes OpenAPI
schemas that kubernetes-validate ships, in strict mode (unknown fields are errors)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

from tests.support.promtool import check_rules
from worker.protocol.fields import Channel
from worker.settings import Settings

PROJECT = Path(__file__).resolve().parents[1]
CHART = PROJECT / "helm" / "smsc-worker"
RELEASE, NAMESPACE = "prod", "sms"
FULLNAME = "prod-smsc-worker"
CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# The oldest Kubernetes the chart claims (Chart.yaml's kubeVersion) and the newest that
# kubernetes-validate knows.
OLDEST_KUBE = CHART_YAML["kubeVersion"].removeprefix(">=").removesuffix("-0").strip()
KUBE_VERSIONS = (OLDEST_KUBE, latest_version())
SECRET_FILES = {
    "SMSC_AMQP__URL", "SMSC_GATEWAY__PASSWORD", "SMSC_SMTP__PASSWORD", "SMSC_STATE__URL",
    "SMSC_REPLY__TOKEN_KEY", "SMSC_REPLY__TOKEN_KEYS_OLD",
    # The named account of the options' value set.
    "SMSC_ACCOUNTS__BRAND-B__PASSWORD",
}  # fmt: skip

# The required secrets alone: enough for one replica, which may keep its state in memory.
CREDENTIALS_WITHOUT_STATE = """
secrets:
  amqpUrl: amqp://worker:s3cret@rabbitmq.sms.svc:5672/sms
  gatewayPassword: gateway-pass
"""
STATE_URL = "redis://:r3dis-pass@redis.sms.svc:6379/0"
# More than one replica (the chart's default is 2) needs the shared state store too.
CREDENTIALS = CREDENTIALS_WITHOUT_STATE + f"  stateUrl: {STATE_URL}\n"
SHARED_STATE_MESSAGE = (
    "replicas share their ledger and limits in Redis; "
    "set secrets.stateUrl (or secrets.existingSecret with SMSC_STATE__URL)"
)
# The value sets every render test runs with, written as a user's values files.
VALUE_SETS = {
    "defaults": CREDENTIALS,
    "keda": CREDENTIALS
    + """
autoscaling:
  keda:
    enabled: true
    queueName: sms.priority
""",
    "hpa": CREDENTIALS
    + """
autoscaling:
  hpa:
    enabled: true
    maxReplicas: 4
""",
    "existing-secret": """
secrets:
  existingSecret: smsc-credentials
autoscaling:
  keda:
    enabled: true
""",
    "single-replica": CREDENTIALS_WITHOUT_STATE + "replicaCount: 1\n",
    "service-monitor": CREDENTIALS
    + """
serviceMonitor:
  enabled: true
  labels:
    release: prometheus
""",
    "monitoring": CREDENTIALS
    + """
grafanaDashboard:
  enabled: true
  label: sms_dashboard
  labelValue: "yes"
  annotations:
    grafana_folder: SMS
  namespace: monitoring
prometheusRule:
  enabled: true
  labels:
    release: prometheus
  alertLabels:
    team: messaging
  rabbitmqSelector: namespace="rabbitmq"
""",
    # Every other optional branch of the templates at once.
    "options": """
secrets:
  amqpUrl: amqps://worker:s3cret@rabbitmq.example.net:5671/sms
  gatewayPassword: api-key
  smtpPassword: smtp-pass
  stateUrl: rediss://worker:r3dis-pass@redis.example.net:6380/2
  replyTokenKey: t0ken-key-2026
  replyTokenKeysOld: t0ken-key-2024,t0ken-key-2025
  accountPasswords:
    brand-b: brand-b-pass
image:
  repository: registry.example.net/smsc-worker
  digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
imagePullSecrets:
  - name: registry
serviceAccount:
  create: false
  name: smsc
podAnnotations:
  example.net/team: messaging
podLabels:
  tier: backend
settings:
  accounts:
    brand-b:
      login: brandb
      mails_per_second: 2.5
      default_senders:
        email: news@brand-b.example
  gateway:
    login: acme
    text_tags: true
    default_senders:
      email: noreply@shop.example
      telegram: Shop
  smtp:
    username: acme
    security: starttls
    port: 587
  amqp:
    prefetch: 1000000
  default_channel: telegram
  state:
    key_prefix: smsc-prod
    timeout_s: 0.5
  observability:
    health_port: 8081
    metrics_port: 9200
    drain_timeout_s: 90.5
  reply:
    address: sms@replies.example.net
    allowed_networks: 203.0.113.0/24,2001:db8::/32
    allowed_senders: "@send.smscentre.com"
preStopSleepSeconds: 0
replyService:
  type: LoadBalancer
  loadBalancerSourceRanges: [203.0.113.0/24]
networkPolicy:
  enabled: true
  replySources: [203.0.113.0/24, 2001:db8::/32]
  metricsSources: [10.0.0.0/8]
podDisruptionBudget:
  minAvailable: 50%
  maxUnavailable: null
nodeSelector:
  kubernetes.io/os: linux
tolerations:
  - key: dedicated
    operator: Equal
    value: sms
    effect: NoSchedule
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              app.kubernetes.io/name: smsc-worker
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
priorityClassName: high
""",
}
# Custom resources: kubernetes-validate has no schemas for them, so check_custom_resource
# checks them against their CRDs' top-level spec fields and their references.
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
TRIGGER_AUTHENTICATION_SPEC = {
    "secretTargetRef", "env", "configMapTargetRef", "hashiCorpVault", "podIdentity",
    "azureKeyVault", "gcpSecretManager", "awsSecretManager", "boundServiceAccountToken",
}  # fmt: skip
PROMETHEUS_RULE_FIELDS = {"alert", "record", "expr", "for", "labels", "annotations"}
SERVICE_MONITOR_SPEC = {
    "endpoints", "selector", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
    "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeProtocols",
}  # fmt: skip


DASHBOARD = f"{FULLNAME}-dashboard"
DASHBOARD_FILE = CHART / "dashboards" / "smsc-worker.json"


def values_file(text: str) -> dict[str, Any]:
    """A values file as `helm -f` reads it."""
    return helm.values_from_yaml(text)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, text: str) -> list[dict[str, Any]]:
    manifests = chart.render(values_file(text), name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for path, manifest in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(manifest)
        if doc
    ]


def notes(chart: helm.Chart, text: str) -> str:
    manifests = chart.render(values_file(text), name=RELEASE, namespace=NAMESPACE)
    return manifests["smsc-worker/templates/NOTES.txt"]


def one(docs: list[dict[str, Any]], kind: str, name: str = FULLNAME) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    main: dict[str, Any]
    (main,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def check_custom_resource(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    spec = doc["spec"]
    if doc["kind"] == "ScaledObject":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert set(spec) <= SCALED_OBJECT_SPEC
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": one(docs, "Deployment")["metadata"]["name"],
        }
        for trigger in spec["triggers"]:
            assert trigger["type"] == "rabbitmq"
            assert trigger["metadata"]["mode"] == "QueueLength"
            assert all(isinstance(v, str) for v in trigger["metadata"].values())
            one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    elif doc["kind"] == "TriggerAuthentication":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert set(spec) <= TRIGGER_AUTHENTICATION_SPEC
        (ref,) = spec["secretTargetRef"]
        assert ref["parameter"] == "host"
        assert ref["key"] == "SMSC_AMQP__URL"
        assert ref["name"] == secret_volume(docs)["secretName"]
    elif doc["kind"] == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(spec) <= SERVICE_MONITOR_SPEC
        selected = [
            s
            for s in docs
            if s["kind"] == "Service"
            and spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert [s["metadata"]["name"] for s in selected] == [f"{FULLNAME}-metrics"]
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
    elif doc["kind"] == "PrometheusRule":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) == {"name", "rules"}
            assert all(set(rule) <= PROMETHEUS_RULE_FIELDS for rule in group["rules"])
        check_rules(spec["groups"])
    else:
        pytest.fail(f"no check for {doc['apiVersion']} {doc['kind']}")


def secret_volume(docs: list[dict[str, Any]]) -> dict[str, Any]:
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    volume: dict[str, Any]
    (volume,) = [v["secret"] for v in volumes if "secret" in v]
    return volume


@pytest.mark.parametrize("value_set", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_chart_lints_clean(value_set: str, kube_version: str) -> None:
    report = helm.lint(
        CHART, values_file(VALUE_SETS[value_set]), strict=True, kube_version=f"v{kube_version}"
    )
    # Severity 1 is informational (e.g. "icon is recommended"); 2 warning, 3 error.
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("value_set", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_match_kubernetes_schemas(
    chart: helm.Chart, value_set: str, kube_version: str
) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    for doc in docs:
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            check_custom_resource(doc, docs)
        else:
            kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize(
    ("value_set", "expected"),
    [
        ("defaults", set()),
        ("single-replica", set()),
        ("keda", {"ScaledObject", "TriggerAuthentication"}),
        ("hpa", {"HorizontalPodAutoscaler"}),
        ("existing-secret", {"ScaledObject", "TriggerAuthentication"}),
        ("service-monitor", {"ServiceMonitor"}),
        ("options", {"NetworkPolicy"}),
        ("monitoring", {"PrometheusRule", "dashboard"}),
    ],
)
def test_optional_resources_follow_their_switches(
    chart: helm.Chart, value_set: str, expected: set[str]
) -> None:
    optional = {"ScaledObject", "TriggerAuthentication", "HorizontalPodAutoscaler"}
    optional |= {"ServiceMonitor", "NetworkPolicy", "PrometheusRule"}
    docs = render(chart, VALUE_SETS[value_set])
    dashboards = {"dashboard"} if [d for d in docs if d["metadata"]["name"] == DASHBOARD] else set()
    assert (kinds(docs) & optional) | dashboards == expected
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds(docs)


@pytest.mark.parametrize(
    "typo",
    [
        "replicaCont: 3",
        "settings:\n  gateway:\n    logn: acme",
        "autoscaling:\n  keda:\n    queuename: sms.requests",
        "secrets:\n  amqpURL: amqp://x",
        "secrets:\n  stateURL: redis://x",
        # Secret settings have no place in the ConfigMap's settings.
        "settings:\n  gateway:\n    password: hunter2",
        "settings:\n  amqp:\n    url: amqp://x",
        "settings:\n  state:\n    url: redis://x",
    ],
)
def test_unknown_values_are_rejected(chart: helm.Chart, typo: str) -> None:
    # The schema is checked before any template runs, so no other values are needed.
    with pytest.raises(helm.HelmValuesError, match="additional properties"):
        render(chart, typo)


@pytest.mark.parametrize(
    "mistyped",
    [
        'replicaCount: "3"',
        "settings:\n  smtp:\n    port: '25'",
        "settings:\n  smtp:\n    security: ssl",
        "settings:\n  observability:\n    drain_timeout_s: 0",
        "autoscaling:\n  hpa:\n    enabled: 'yes'",
        "serviceMonitor:\n  interval: 30",
        "podDisruptionBudget:\n  maxUnavailable: one",
        "replyService:\n  type: Ingress",
        "replyService:\n  loadBalancerSourceRanges: [203.0.113.1]",
        "networkPolicy:\n  replySources: [gateway.example.com]",
        "networkPolicy:\n  enabled: 'true'",
        "secrets:\n  stateUrl: 6379",
        # Scaling to zero would leave no receiver for the gateway's replies.
        "autoscaling:\n  keda:\n    minReplicaCount: 0",
    ],
)
def test_mistyped_values_are_rejected(chart: helm.Chart, mistyped: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(chart, mistyped)


def test_hpa_and_keda_together_are_rejected(chart: helm.Chart) -> None:
    both = "autoscaling:\n  hpa:\n    enabled: true\n  keda:\n    enabled: true\n"
    with pytest.raises(helm.HelmRenderError, match="enable at most one"):
        render(chart, CREDENTIALS + both)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("secrets:\n  gatewayPassword: x", "secrets.amqpUrl is required"),
        ("secrets:\n  amqpUrl: amqp://x", "secrets.gatewayPassword is required"),
        (CREDENTIALS + "podDisruptionBudget:\n  minAvailable: 1", "not both"),
        (CREDENTIALS + "preStopSleepSeconds: 15", "shorter than terminationGraceExtraSeconds"),
        (
            CREDENTIALS + "networkPolicy:\n  enabled: true",
            "networkPolicy.replySources is empty",
        ),
    ],
)
def test_inconsistent_values_fail_the_render(chart: helm.Chart, values: str, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        # The chart's default replicaCount is 2.
        ("", "replicaCount is 2"),
        ("replicaCount: 3", "replicaCount is 3"),
        ("replicaCount: 1\nautoscaling:\n  hpa:\n    enabled: true", "autoscaling.hpa.enabled"),
        ("replicaCount: 1\nautoscaling:\n  keda:\n    enabled: true", "autoscaling.keda.enabled"),
    ],
)
def test_more_than_one_replica_needs_shared_state(
    chart: helm.Chart, values: str, named: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as failed:
        render(chart, CREDENTIALS_WITHOUT_STATE + values)
    assert named in str(failed.value)
    assert SHARED_STATE_MESSAGE in str(failed.value)


@pytest.mark.parametrize(
    "scaling",
    [
        "replicaCount: 2",
        "autoscaling:\n  hpa:\n    enabled: true",
        "autoscaling:\n  keda:\n    enabled: true",
    ],
)
@pytest.mark.parametrize(
    "secrets",
    [CREDENTIALS, "secrets:\n  existingSecret: smsc-credentials\n"],
    ids=["state-url", "existing-secret"],
)
def test_shared_state_allows_more_than_one_replica(
    chart: helm.Chart, secrets: str, scaling: str
) -> None:
    """An existing Secret is taken to hold SMSC_STATE__URL, as it is SMSC_AMQP__URL."""
    one(render(chart, secrets + scaling), "Deployment")


def test_one_replica_may_keep_its_state_in_memory(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["single-replica"])
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert "SMSC_STATE__URL" not in one(docs, "Secret")["data"]
    assert "shared with no other pod" in notes(chart, VALUE_SETS["single-replica"])
    assert "Replicas share their ledger and limits through Redis" in notes(chart, CREDENTIALS)


@pytest.mark.parametrize("value_set", ["defaults", "options"])
def test_state_url_is_a_secret_file(chart: helm.Chart, value_set: str) -> None:
    values = VALUE_SETS[value_set]
    (url,) = re.findall(r"stateUrl: (\S+)", values)
    manifests = chart.render(values_file(values), name=RELEASE, namespace=NAMESPACE)
    docs = render(chart, values)
    assert base64.b64decode(one(docs, "Secret")["data"]["SMSC_STATE__URL"]).decode() == url
    # Nowhere else in clear: not in the ConfigMap, the Deployment or the notes.
    assert [path for path, text in manifests.items() if url in text] == []
    assert "SMSC_STATE__URL" not in one(docs, "ConfigMap")["data"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_is_hardened(chart: helm.Chart, value_set: str) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    main = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    tmp = next(m for m in main["volumeMounts"] if m["mountPath"] == "/tmp")
    assert {"name": tmp["name"], "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert pod["automountServiceAccountToken"] is False
    assert main["resources"]["requests"]
    assert main["resources"]["limits"]["memory"]


@pytest.mark.parametrize("value_set", ["defaults", "options"])
def test_probes_and_ports_follow_the_settings(chart: helm.Chart, value_set: str) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    main = container(docs)
    env = one(docs, "ConfigMap")["data"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {
        "smtp": int(env["SMSC_REPLY__PORT"]),
        "health": int(env["SMSC_OBSERVABILITY__HEALTH_PORT"]),
        "metrics": int(env["SMSC_OBSERVABILITY__METRICS_PORT"]),
    }
    for probe, path in [("startupProbe", "/livez"), ("livenessProbe", "/livez")]:
        assert main[probe]["httpGet"] == {"path": path, "port": "health"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    reply = one(docs, "Service", f"{FULLNAME}-reply")["spec"]["ports"]
    metrics = one(docs, "Service", f"{FULLNAME}-metrics")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in reply] == [(2525, "smtp")]
    assert [(p["port"], p["targetPort"]) for p in metrics] == [(9100, "metrics")]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_secrets_reach_the_pod_only_as_files(chart: helm.Chart, value_set: str) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    main = container(docs)
    assert all("secretRef" not in source for source in main["envFrom"])
    assert all("valueFrom" not in variable for variable in main["env"])
    assert not SECRET_FILES & set(one(docs, "ConfigMap")["data"])
    for secret in (
        "s3cret", "gateway-pass", "api-key", "smtp-pass", "r3dis-pass", "t0ken-key", "brand-b-pass"
    ):  # fmt: skip
        assert secret not in json.dumps(one(docs, "ConfigMap"))
    secrets_dir = next(v["value"] for v in main["env"] if v["name"] == "SMSC_SECRETS_DIR")
    volume = secret_volume(docs)
    (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == secrets_dir]
    assert mount["readOnly"] is True
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": mount["name"], "secret": volume} in volumes
    created = [d for d in docs if d["kind"] == "Secret"]
    if value_set == "existing-secret":
        assert not created
        assert volume["secretName"] == "smsc-credentials"
    else:
        assert volume["secretName"] == one(docs, "Secret")["metadata"]["name"]
        assert set(one(docs, "Secret")["data"]) <= SECRET_FILES


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_grace_period_outlasts_the_drain(chart: helm.Chart, value_set: str) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    drain = float(one(docs, "ConfigMap")["data"]["SMSC_OBSERVABILITY__DRAIN_TIMEOUT_S"])
    pre_stop = container(docs).get("lifecycle", {}).get("preStop", {}).get("exec", {})
    waited = int(pre_stop["command"][1]) if pre_stop else 0
    # The kubelet's countdown starts before preStop; the worker still needs its whole drain.
    assert pod["terminationGracePeriodSeconds"] - waited > drain
    assert pod["terminationGracePeriodSeconds"] == math.ceil(drain) + 15


def test_config_changes_roll_the_pods(chart: helm.Chart) -> None:
    def annotations(values: str) -> dict[str, str]:
        template = one(render(chart, values), "Deployment")["spec"]["template"]
        found: dict[str, str] = template["metadata"]["annotations"]
        return found

    base = annotations(CREDENTIALS)
    setting = annotations(CREDENTIALS + "settings:\n  gateway:\n    login: other")
    secret = annotations(CREDENTIALS.replace("gateway-pass", "rotated"))
    state = annotations(CREDENTIALS.replace(STATE_URL, "redis://redis-2.sms.svc:6379/0"))
    assert setting["checksum/config"] != base["checksum/config"]
    assert setting["checksum/secret"] == base["checksum/secret"]
    assert secret["checksum/secret"] != base["checksum/secret"]
    assert state["checksum/secret"] != base["checksum/secret"]
    assert state["checksum/config"] == base["checksum/config"]
    assert "checksum/secret" not in annotations(VALUE_SETS["existing-secret"])


@pytest.mark.parametrize(("value_set", "fixed"), [("defaults", True), ("hpa", False)])
def test_autoscaler_owns_the_replica_count(chart: helm.Chart, value_set: str, fixed: bool) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    assert ("replicas" in one(docs, "Deployment")["spec"]) is fixed


def test_keda_scales_on_every_lanes_queue(chart: helm.Chart) -> None:
    default = render(chart, VALUE_SETS["existing-secret"])
    (triggers,) = [d["spec"]["triggers"] for d in default if d["kind"] == "ScaledObject"]
    queue = one(default, "ConfigMap")["data"]["SMSC_AMQP__REQUESTS_QUEUE"]
    assert [t["metadata"]["queueName"] for t in triggers] == [
        queue,
        f"{queue}.high",
        f"{queue}.bulk",
    ]
    overridden = render(chart, VALUE_SETS["keda"])
    (triggers,) = [d["spec"]["triggers"] for d in overridden if d["kind"] == "ScaledObject"]
    assert triggers[0]["metadata"]["queueName"] == "sms.priority"
    # A named account's queues count too.
    with_account = VALUE_SETS["keda"].replace(
        "secrets:\n", "secrets:\n  accountPasswords:\n    brand-b: pass\n", 1
    )
    accounts = render(
        chart, with_account + "settings:\n  accounts:\n    brand-b:\n      login: brandb\n"
    )
    (triggers,) = [d["spec"]["triggers"] for d in accounts if d["kind"] == "ScaledObject"]
    assert [t["metadata"]["queueName"] for t in triggers][3:] == [
        "sms.priority.account.brand-b",
        "sms.priority.account.brand-b.high",
        "sms.priority.account.brand-b.bulk",
    ]


def loaded(docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker's settings from the ConfigMap's variables and the Secret's files, as the
    pod sees them."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in one(docs, "Secret")["data"].items():
        (secrets_dir / key).write_bytes(base64.b64decode(value))
    for name in [n for n in os.environ if n.startswith("SMSC_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for name, value in one(docs, "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SMSC_SECRETS_DIR", str(secrets_dir))
    return Settings()


def test_the_imap_reply_source_reaches_the_worker(
    chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = (
        CREDENTIALS
        + """
  imapPassword: m4ilbox-pass
settings:
  reply:
    source: imap
    address: sms@example.net
    imap:
      host: imap.example.net
      user: sms@example.net
      processed_folder: SMS/done
      poll_interval_s: 15.5
"""
    )
    docs = render(chart, values)
    config = one(docs, "ConfigMap")["data"]
    assert config["SMSC_REPLY__IMAP__HOST"] == "imap.example.net"
    assert "m4ilbox-pass" not in json.dumps(config)
    reply = loaded(docs, tmp_path, monkeypatch).reply
    assert reply.source == "imap"
    assert (reply.imap.host, reply.imap.port, reply.imap.security) == (
        "imap.example.net",
        993,
        "tls",
    )
    assert (reply.imap.processed_folder, reply.imap.poll_interval_s) == ("SMS/done", 15.5)
    assert reply.imap.password.get_secret_value() == "m4ilbox-pass"


def test_rendered_configuration_loads_in_the_worker(
    chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's variables and the Secret's files, as the pod sees them, are valid
    worker settings and carry the values given to the chart."""
    settings = loaded(render(chart, VALUE_SETS["options"]), tmp_path, monkeypatch)
    assert settings.amqp.url.get_secret_value().startswith("amqps://worker:s3cret@")
    assert settings.gateway.password.get_secret_value() == "api-key"
    assert settings.smtp.password.get_secret_value() == "smtp-pass"
    assert settings.state.url.get_secret_value() == (
        "rediss://worker:r3dis-pass@redis.example.net:6380/2"
    )
    assert (settings.state.key_prefix, settings.state.timeout_s) == ("smsc-prod", 0.5)
    assert (settings.gateway.login, settings.gateway.text_tags) == ("acme", True)
    assert settings.amqp.prefetch == 1_000_000
    assert settings.observability.drain_timeout_s == 90.5
    assert settings.default_channel == "telegram"
    assert settings.gateway.default_senders == {"email": "noreply@shop.example", "telegram": "Shop"}
    assert settings.reply.token_key.get_secret_value() == "t0ken-key-2026"
    assert settings.reply.token_keys_old.get_secret_value() == "t0ken-key-2024,t0ken-key-2025"
    assert settings.reply.allowed_networks == "203.0.113.0/24,2001:db8::/32"
    assert settings.reply.allowed_senders == "@send.smscentre.com"
    brand = settings.accounts["brand-b"]
    assert (brand.login, brand.mails_per_second) == ("brandb", 2.5)
    assert brand.default_senders == {Channel.email: "news@brand-b.example"}
    assert brand.password.get_secret_value() == "brand-b-pass"


def _settings_fields() -> dict[str, Any]:
    """Each non-secret setting's JSON schema, as values.schema.json must accept it."""
    full = Settings.model_json_schema()
    defs = full["$defs"]
    kept = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "description")

    def resolve(prop: dict[str, Any]) -> dict[str, Any]:
        ref = prop.get("$ref")
        return {**defs[ref.rsplit("/", 1)[1]], **prop} if ref else prop

    def field(prop: dict[str, Any]) -> dict[str, Any]:
        resolved = resolve(prop)
        if "properties" in resolved:  # a group within a group (reply.imap)
            return {
                f: field(p) for f, p in resolved["properties"].items() if not p.get("writeOnly")
            }
        found = {k: resolved[k] for k in kept if k in resolved}
        # A mapping setting: the schema of its keys and of its values (types only).
        for part in ("additionalProperties", "propertyNames"):
            if isinstance(resolved.get(part), dict):
                found[part] = {k: v for k, v in field(resolved[part]).items() if k != "description"}
        return found

    fields: dict[str, Any] = {}
    for name, prop in full["properties"].items():
        group = resolve(prop)
        if isinstance(group.get("additionalProperties"), dict):  # named entries: accounts
            entry = resolve(group["additionalProperties"])
            fields[name] = {
                f: field(p) for f, p in entry["properties"].items() if not p.get("writeOnly")
            }
        elif group.get("type") == "object":
            fields[name] = {
                f: field(p) for f, p in group["properties"].items() if not p.get("writeOnly")
            }
        else:
            fields[name] = field(prop)
    return fields


def test_settings_schema_matches_the_worker() -> None:
    """values.schema.json's settings are the worker's non-secret settings, with the same
    types and limits: a setting added to or changed in worker/settings.py must be added to
    or changed in the chart's schema too."""

    def fields(node: dict[str, Any]) -> dict[str, Any]:
        # A group's settings, a group within a group's too; a mapping setting (an object
        # with no properties) is one setting.
        if "properties" not in node:
            entry = node.get("additionalProperties")
            if isinstance(entry, dict) and "properties" in entry:  # named entries: accounts
                return fields(entry)
            return node
        return {name: fields(child) for name, child in node["properties"].items()}

    chart_settings = SCHEMA["properties"]["settings"]["properties"]
    assert {name: fields(node) for name, node in chart_settings.items()} == _settings_fields()


# Objects whose contents are Kubernetes structures passed through to the API as they are;
# the manifest validation checks them instead.
PASS_THROUGH = {
    "/properties/global",
    "/properties/affinity/properties/nodeAffinity",
    "/properties/affinity/properties/podAffinity",
    "/properties/affinity/properties/podAntiAffinity",
    "/properties/topologySpreadConstraints/items/properties/labelSelector",
}


def test_schema_closes_every_object() -> None:
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                open_objects.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}/{index}")

    walk(SCHEMA, "")
    assert set(open_objects) == PASS_THROUGH
    assert SCHEMA["additionalProperties"] is False


def test_default_values_satisfy_the_schema(chart: helm.Chart) -> None:
    chart.validate_schema(chart.values)


def test_app_version_is_the_project_version() -> None:
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    assert CHART_YAML["apiVersion"] == "v2"
    assert CHART_YAML["appVersion"] == project["version"]


def test_notes_tell_how_to_send_a_test_request(chart: helm.Chart) -> None:
    text = notes(chart, CREDENTIALS)
    assert (
        f"kubectl -n {NAMESPACE} exec deploy/{FULLNAME} -- "
        "smsc-worker send --to +79991234567 --text hello --wait"
    ) in text


def test_topology_spread_defaults_to_this_releases_pods(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["options"])
    (constraint,) = one(docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    selector = one(docs, "Deployment")["spec"]["selector"]
    assert constraint["labelSelector"] == selector


def test_replies_and_scrapes_reach_pods_that_are_not_ready(chart: helm.Chart) -> None:
    """Draining pods and pods with an open circuit still need the gateway's replies, and
    that is when their metrics matter most."""
    docs = render(chart, CREDENTIALS)
    for suffix in ("reply", "metrics"):
        service = one(docs, "Service", f"{FULLNAME}-{suffix}")
        assert service["spec"]["publishNotReadyAddresses"] is True


@pytest.mark.parametrize("kind", ["LoadBalancer", "NodePort"])
def test_the_reply_service_keeps_the_client_address(chart: helm.Chart, kind: str) -> None:
    """The receiver's and a NetworkPolicy's allow-lists look at the client's address: the
    reply Service must not replace it with a node's (externalTrafficPolicy Cluster)."""
    values = CREDENTIALS + f"replyService:\n  type: {kind}\n"
    values += "  loadBalancerSourceRanges: [203.0.113.0/24, 198.51.100.7/32]\n"
    spec = one(render(chart, values), "Service", f"{FULLNAME}-reply")["spec"]
    assert spec["externalTrafficPolicy"] == "Local"
    if kind == "LoadBalancer":
        assert spec["loadBalancerSourceRanges"] == ["203.0.113.0/24", "198.51.100.7/32"]
    else:
        assert "loadBalancerSourceRanges" not in spec


def test_the_network_policy_opens_the_reply_port_to_the_sources_only(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["options"])
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == one(docs, "Deployment")["spec"]["selector"]
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert all(len(rule["ports"]) == 1 for rule in policy["ingress"])
    assert set(by_port) == {"smtp", "health", "metrics"}
    assert by_port["smtp"]["from"] == [
        {"ipBlock": {"cidr": "203.0.113.0/24"}},
        {"ipBlock": {"cidr": "2001:db8::/32"}},
    ]
    assert "from" not in by_port["health"]  # the kubelet's probes
    assert by_port["metrics"]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    ports = {p["name"] for p in container(docs)["ports"]}
    assert set(by_port) <= ports


@pytest.mark.parametrize(
    ("values", "label", "namespace"),
    [
        (
            CREDENTIALS + "grafanaDashboard:\n  enabled: true\n",
            ("grafana_dashboard", "1"),
            NAMESPACE,
        ),
        (VALUE_SETS["monitoring"], ("sms_dashboard", "yes"), "monitoring"),
    ],
)
def test_the_dashboard_ships_as_a_config_map_for_the_grafana_sidecar(
    chart: helm.Chart, values: str, label: tuple[str, str], namespace: str
) -> None:
    config_map = one(render(chart, values), "ConfigMap", DASHBOARD)
    name, value = label
    assert config_map["metadata"]["labels"][name] == value
    assert config_map["metadata"]["namespace"] == namespace
    (key,) = config_map["data"]
    assert key.endswith(".json")
    assert json.loads(config_map["data"][key]) == json.loads(DASHBOARD_FILE.read_text())


def test_the_alerts_select_this_releases_series(chart: helm.Chart) -> None:
    """By default the rules read the job and namespace this chart's ServiceMonitor gives
    the worker's series; RabbitMQ's series are matched on the queue names from settings."""
    values = CREDENTIALS
    values += "settings:\n  amqp:\n    requests_queue: sms.eu\n    dead_letter_queue: sms.eu.dead\n"
    values += "prometheusRule:\n  enabled: true\n"
    (group,) = one(render(chart, values), "PrometheusRule")["spec"]["groups"]
    worker = f'job="{FULLNAME}-metrics", namespace="{NAMESPACE}"'
    for rule in group["rules"]:
        for selector in re.findall(r"smsc_\w+\{([^}]*)\}", rule["expr"]):
            assert selector.startswith(worker), rule["alert"]
        for selector in re.findall(r"rabbitmq_\w+\{([^}]*)\}", rule["expr"]):
            assert selector in {r"queue=~`sms\.eu(\.high|\.bulk)?`", 'queue="sms.eu.dead"'}
    custom = values + '  selector: cluster="eu", app="sms"\n'
    (group,) = one(render(chart, custom), "PrometheusRule")["spec"]["groups"]
    assert all(worker not in rule["expr"] for rule in group["rules"])
    assert all('cluster="eu", app="sms"' in rule["expr"] for rule in group["rules"])
