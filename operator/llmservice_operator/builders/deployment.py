"""The Deployment that runs the inference server."""

from typing import Any

from llmservice_operator.builders.common import labels, metadata, selector_labels
from llmservice_operator.builders.config import config_hash
from llmservice_operator.builders.placement import Download, downloads, pvc_claims
from llmservice_operator.builders.resources import downloader_resources, server_resources
from llmservice_operator.builders.spread import topology_spread
from llmservice_operator.constants import (
    ANNOTATION_CONFIG_HASH,
    CACHE_MOUNT,
    GPU_RESOURCE,
    HEALTH_LIVE_PATH,
    HEALTH_READY_PATH,
    METRICS_PATH,
    PVC_MOUNT_ROOT,
    SERVER_PORT,
    SERVER_PORT_NAME,
)
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import LLMService

# Model loads take minutes: the startup probe allows 30 minutes before liveness takes over.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 180
TERMINATION_GRACE_SECONDS = 120
SHM_SIZE = "2Gi"
UID = 1000

CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def _dump(models: list[Any]) -> list[dict[str, Any]]:
    return [model.model_dump(by_alias=True, exclude_none=True) for model in models]


def _tolerations(svc: LLMService) -> list[dict[str, Any]]:
    tolerations = _dump(svc.spec.tolerations)
    if svc.spec.gpus > 0:
        tolerations.insert(0, {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    context: dict[str, Any] = {"runAsNonRoot": True}
    # OpenShift's restricted-v2 SCC assigns UID, GID and fsGroup from the namespace's range and refuses a
    # pod that fixes them outside it; runAsNonRoot alone is admitted there.
    if settings.platform != "openshift":
        context.update(runAsUser=UID, runAsGroup=UID, fsGroup=UID)
    context["seccompProfile"] = {"type": "RuntimeDefault"}
    return context


def _volumes(svc: LLMService) -> list[dict[str, Any]]:
    cache = svc.spec.cache
    cache_volume: dict[str, Any] = {"name": "cache"}
    if cache.claim_name:
        cache_volume["persistentVolumeClaim"] = {"claimName": cache.claim_name}
    else:
        cache_volume["emptyDir"] = {"sizeLimit": cache.size_limit}
    volumes = [
        cache_volume,
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        {"name": "tmp", "emptyDir": {}},
    ]
    for index, claim in enumerate(pvc_claims(svc)):
        volumes.append(
            {
                "name": f"weights-{index}",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
    return volumes


def _weight_mounts(svc: LLMService) -> list[dict[str, Any]]:
    return [
        {"name": f"weights-{index}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
        for index, claim in enumerate(pvc_claims(svc))
    ]


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _init_container(svc: LLMService, image: str, fetch: Download) -> dict[str, Any]:
    args = ["download", "--source", fetch.source, "--dest", fetch.dest]
    if fetch.revision:
        args += ["--revision", fetch.revision]
    env = [{"name": "HF_HOME", "value": f"{CACHE_MOUNT}/hf-home"}]
    if svc.spec.hf_token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", svc.spec.hf_token_secret_ref))
    container: dict[str, Any] = {
        "name": fetch.container_name,
        "image": image,
        "args": args,
        "env": env,
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": downloader_resources(svc),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if svc.spec.image_pull_policy:
        container["imagePullPolicy"] = svc.spec.image_pull_policy
    return container


def _http_probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": SERVER_PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _server_container(svc: LLMService, image: str, config_map: dict[str, Any]) -> dict[str, Any]:
    env = []
    if svc.spec.api_key_secret_ref is not None:
        env.append(_secret_env("LLM_API_KEY", svc.spec.api_key_secret_ref))
    # hf:// adapters are downloaded by the server at run time; a user's own HF_TOKEN entry is kept instead.
    user_names = {item.name for item in svc.spec.env}
    if (
        svc.spec.hf_token_secret_ref is not None
        and svc.spec.task == "generate"
        and "HF_TOKEN" not in user_names
    ):
        env.append(_secret_env("HF_TOKEN", svc.spec.hf_token_secret_ref))
    env += _dump(svc.spec.env)
    container: dict[str, Any] = {
        "name": "server",
        "image": image,
        "args": ["serve", *svc.spec.args],
        # The operator's ConfigMap last: of several envFrom sources the last wins, and a user's Secret
        # or ConfigMap must not quietly override what the spec says (the CRD refuses those names in env).
        "envFrom": [*_dump(svc.spec.env_from), {"configMapRef": {"name": config_map["metadata"]["name"]}}],
        "ports": [{"name": SERVER_PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "startupProbe": _http_probe(HEALTH_READY_PATH, STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD, 5),
        "readinessProbe": _http_probe(HEALTH_READY_PATH, 5, 3, 3),
        "livenessProbe": _http_probe(HEALTH_LIVE_PATH, 15, 4, 5),
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            *_weight_mounts(svc),
        ],
        "resources": server_resources(svc),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        # The server writes why it failed (e.g. an adapter that did not load) to /dev/termination-log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env:
        container["env"] = env
    if svc.spec.image_pull_policy:
        container["imagePullPolicy"] = svc.spec.image_pull_policy
    return container


def _pod_spec(
    svc: LLMService, settings: OperatorSettings, image: str, config_map: dict[str, Any]
) -> dict[str, Any]:
    spec = svc.spec
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": _pod_security_context(settings),
        "containers": [_server_container(svc, image, config_map)],
        "volumes": _volumes(svc),
    }
    init_containers = [_init_container(svc, image, fetch) for fetch in downloads(svc)]
    if init_containers:
        pod["initContainers"] = init_containers
    tolerations = _tolerations(svc)
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        pod["affinity"] = spec.affinity
    spread = topology_spread(svc)
    if spread:
        pod["topologySpreadConstraints"] = spread
    if spec.runtime_class_name:
        pod["runtimeClassName"] = spec.runtime_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = _dump(spec.image_pull_secrets)
    return pod


def build_deployment(
    svc: LLMService, settings: OperatorSettings, config_map: dict[str, Any]
) -> dict[str, Any]:
    image = svc.spec.image or settings.inference_image
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(svc)},
        # A new pod must be ready before an old one goes (no capacity dip); this needs one spare GPU.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 3,
        # Downloads and model loads are slow: do not call a rollout stuck before the startup probe would.
        "progressDeadlineSeconds": 2400,
        "template": {
            "metadata": {
                "labels": labels(svc),
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(SERVER_PORT),
                    "prometheus.io/path": METRICS_PATH,
                    ANNOTATION_CONFIG_HASH: config_hash(config_map),
                },
            },
            "spec": _pod_spec(svc, settings, image, config_map),
        },
    }
    # With an HPA the autoscaler owns spec.replicas; writing it here would fight it (the operator copies
    # the HPA's count into the LLMService's spec.replicas instead: see replicas.py).
    if svc.spec.autoscaling is None:
        deployment_spec = {"replicas": svc.spec.replicas, **deployment_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(svc),
        "spec": deployment_spec,
    }
