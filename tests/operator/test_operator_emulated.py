"""The real kopf operator against the kmock Kubernetes emulator: what a user of the cluster would see."""

import threading
import time
from typing import Any

import pytest
from lightkube import ApiError, Client
from lightkube.codecs import from_dict
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import ConfigMap, Event, Pod, Service
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from llmservice_operator.constants import ANNOTATION_CONFIG_HASH
from tests.operator.harness import Cluster, LLMServiceResource, RunningOperator, eventually

pytestmark = pytest.mark.usefixtures("operator")

SELECTOR = {"app.kubernetes.io/name": "llmservice", "app.kubernetes.io/instance": "bot"}
BASE_SPEC: dict[str, Any] = {
    "model": {"source": "hf://acme/tiny-llama", "revision": "v1"},
    "adapters": [{"name": "support", "source": "hf://acme/support-lora"}],
    "gpus": 1,
    "replicas": 1,
}


def create(kube: Client, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return kube.create(LLMServiceResource(manifest), namespace=namespace).to_dict()


def edit_spec(kube: Client, namespace: str, name: str, changes: dict[str, Any]) -> None:
    kube.patch(LLMServiceResource, name, {"spec": changes}, namespace=namespace, patch_type=PatchType.MERGE)


def get(kube: Client, resource: Any, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(resource, name, namespace=namespace).to_dict()


def absent(kube: Client, resource: Any, namespace: str, name: str) -> bool:
    try:
        kube.get(resource, name, namespace=namespace)
    except ApiError as error:
        return error.status.code == 404
    return False


def condition(kube: Client, namespace: str, name: str, kind: str) -> dict[str, Any]:
    status = get(kube, LLMServiceResource, namespace, name).get("status") or {}
    for item in status.get("conditions", []):
        if item["type"] == kind:
            return item
    raise AssertionError(f"no {kind} condition yet")


def events(kube: Client, namespace: str) -> list[dict[str, Any]]:
    return [event.to_dict() for event in kube.list(Event, namespace=namespace)]


def wait_for_children(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    return eventually(lambda: get(kube, Deployment, namespace, name))


def test_create_builds_owned_children_and_status(kube: Client, namespace: str) -> None:
    spec = {**BASE_SPEC, "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetInFlightRequests": 8}}
    owner = create(kube, namespace, "bot", spec)

    deployment = wait_for_children(kube, namespace, "bot")
    service = eventually(lambda: get(kube, Service, namespace, "bot"))
    hpa = eventually(lambda: get(kube, HorizontalPodAutoscaler, namespace, "bot"))
    pdb = eventually(lambda: get(kube, PodDisruptionBudget, namespace, "bot"))
    config = eventually(lambda: get(kube, ConfigMap, namespace, "bot-config"))

    for child in (deployment, service, hpa, pdb, config):
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "serving.llmservice.io/v1alpha1",
                "kind": "LLMService",
                "name": "bot",
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llmservice-operator"
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "llmservice_in_flight_requests"
    # The model only: adapters are the server's to fetch, so that changing them rolls no pod.
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]] == ["fetch-model"]

    status = eventually(lambda: get(kube, LLMServiceResource, namespace, "bot").get("status"))
    assert status["url"] == f"http://bot.{namespace}.svc.cluster.local"
    assert status["selector"] == "app.kubernetes.io/instance=bot,app.kubernetes.io/name=llmservice"
    assert status["observedGeneration"] == 1
    assert condition(kube, namespace, "bot", "Ready")["status"] == "False"
    assert condition(kube, namespace, "bot", "Progressing")["status"] == "True"
    # No pod is ready to serve the adapter yet.
    assert status["adapters"] == [
        {
            "name": "support",
            "source": "hf://acme/support-lora",
            "state": "Pending",
            "reason": "no ready pod yet",
            "readyPods": 0,
        }
    ]
    adapters_ready = condition(kube, namespace, "bot", "AdaptersReady")
    assert (adapters_ready["status"], adapters_ready["reason"]) == ("False", "AdaptersLoading")
    assert eventually(
        lambda: (
            {event["message"] for event in events(kube, namespace)}
            >= {"Created Deployment bot", "Created Service bot", "Created HorizontalPodAutoscaler bot"}
        )
    )
    assert not get(kube, LLMServiceResource, namespace, "bot")["metadata"].get("finalizers")


def test_spec_edits_reach_every_child(kube: Client, namespace: str) -> None:
    create(kube, namespace, "bot", BASE_SPEC)
    deployment = wait_for_children(kube, namespace, "bot")
    assert deployment["spec"]["replicas"] == 1
    assert absent(kube, HorizontalPodAutoscaler, namespace, "bot")
    assert absent(kube, PodDisruptionBudget, namespace, "bot")
    first_hash = deployment["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG_HASH]

    edit_spec(kube, namespace, "bot", {"replicas": 3, "gpus": 2, "serving": {"maxBatchSize": 64}})

    def edited() -> dict[str, Any]:
        live = get(kube, Deployment, namespace, "bot")
        assert live["spec"]["replicas"] == 3
        assert (
            live["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
        )
        return live

    deployment = eventually(edited)
    assert eventually(
        lambda: get(kube, ConfigMap, namespace, "bot-config")["data"]["LLM_MAX_BATCH_SIZE"] == "64"
    )
    assert deployment["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG_HASH] != first_hash
    assert eventually(lambda: get(kube, PodDisruptionBudget, namespace, "bot"))
    assert eventually(lambda: condition(kube, namespace, "bot", "Ready")["observedGeneration"] == 2)

    # Autoscaling on: an HPA appears and from then on the operator leaves replicas to it.
    edit_spec(kube, namespace, "bot", {"autoscaling": {"minReplicas": 1, "maxReplicas": 5}})
    eventually(lambda: get(kube, HorizontalPodAutoscaler, namespace, "bot"))
    kube.patch(Deployment, "bot", {"spec": {"replicas": 4}}, namespace=namespace, patch_type=PatchType.MERGE)
    edit_spec(kube, namespace, "bot", {"autoscaling": {"maxReplicas": 6}})
    eventually(lambda: get(kube, HorizontalPodAutoscaler, namespace, "bot")["spec"]["maxReplicas"] == 6)
    assert get(kube, Deployment, namespace, "bot")["spec"]["replicas"] == 4

    # Autoscaling off again: the HPA goes.
    edit_spec(kube, namespace, "bot", {"autoscaling": None, "replicas": 1})
    eventually(lambda: absent(kube, HorizontalPodAutoscaler, namespace, "bot"))
    eventually(lambda: absent(kube, PodDisruptionBudget, namespace, "bot"))
    assert eventually(lambda: get(kube, Deployment, namespace, "bot")["spec"]["replicas"] == 1)


def test_children_deleted_or_edited_by_hand_are_restored(kube: Client, namespace: str) -> None:
    create(kube, namespace, "bot", {**BASE_SPEC, "image": "registry.example/llm:1"})
    wait_for_children(kube, namespace, "bot")
    eventually(lambda: get(kube, Service, namespace, "bot"))

    kube.delete(Service, "bot", namespace=namespace)
    restored = eventually(lambda: get(kube, Service, namespace, "bot"))
    assert restored["spec"]["ports"][0]["port"] == 80

    container_patch = {
        "spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil:latest"}]}}}
    }
    kube.patch(Deployment, "bot", container_patch, namespace=namespace, patch_type=PatchType.MERGE)
    eventually(
        lambda: (
            get(kube, Deployment, namespace, "bot")["spec"]["template"]["spec"]["containers"][0].get("image")
            == "registry.example/llm:1"
        )
    )


def test_network_policy_follows_the_spec_and_is_restored(kube: Client, namespace: str) -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
    owner = create(kube, namespace, "bot", BASE_SPEC)
    wait_for_children(kube, namespace, "bot")
    assert absent(kube, NetworkPolicy, namespace, "bot"), "off unless asked for"

    edit_spec(kube, namespace, "bot", {"networkPolicy": {"enabled": True, "ingressFrom": peers}})
    policy = eventually(lambda: get(kube, NetworkPolicy, namespace, "bot"))
    assert policy["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert policy["spec"]["podSelector"] == {"matchLabels": SELECTOR}
    assert policy["spec"]["ingress"] == [{"from": peers, "ports": [{"protocol": "TCP", "port": 8000}]}]
    assert eventually(
        lambda: "Created NetworkPolicy bot" in {event["message"] for event in events(kube, namespace)}
    )

    kube.delete(NetworkPolicy, "bot", namespace=namespace)
    assert eventually(lambda: get(kube, NetworkPolicy, namespace, "bot"))["spec"] == policy["spec"]

    # A widened rule made by hand is put back.
    kube.patch(
        NetworkPolicy,
        "bot",
        {"spec": {"ingress": [{}]}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    eventually(lambda: get(kube, NetworkPolicy, namespace, "bot")["spec"]["ingress"][0].get("from") == peers)

    edit_spec(kube, namespace, "bot", {"networkPolicy": {"enabled": False}})
    eventually(lambda: absent(kube, NetworkPolicy, namespace, "bot"))
    assert eventually(
        lambda: [
            e
            for e in events(kube, namespace)
            if e["reason"] == "Deleted" and e["message"].startswith("Deleted NetworkPolicy bot")
        ]
    )
    assert get(kube, Deployment, namespace, "bot"), "the rest stays"


def test_a_pass_with_nothing_to_change_writes_nothing(
    cluster: Cluster, kube: Client, namespace: str, operator: RunningOperator
) -> None:
    create(kube, namespace, "bot", {**BASE_SPEC, "replicas": 2})
    wait_for_children(kube, namespace, "bot")
    eventually(lambda: get(kube, PodDisruptionBudget, namespace, "bot"))
    eventually(lambda: condition(kube, namespace, "bot", "Ready"))
    assert cluster.emulator is not None
    time.sleep(1)  # let the events of the operator's own writes settle
    passes = operator.metrics_registry.get_sample_value(
        "llmservice_operator_reconciles_total", {"trigger": "child", "result": "ok"}
    )
    before = cluster.emulator.writes()

    # Another controller annotates the Deployment: the operator re-checks everything and finds nothing to do.
    kube.patch(
        Deployment,
        "bot",
        {"metadata": {"annotations": {"example.com/seen": "yes"}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    eventually(
        lambda: (
            operator.metrics_registry.get_sample_value(
                "llmservice_operator_reconciles_total", {"trigger": "child", "result": "ok"}
            )
            > passes
        )
    )
    time.sleep(1)
    assert cluster.emulator.writes() - before == 1, "only the test's own patch"


def deployment_status(kube: Client, namespace: str, name: str, **status: int) -> None:
    generation = get(kube, Deployment, namespace, name)["metadata"]["generation"]
    kube.patch(
        Deployment.Status,
        name,
        {"status": {"observedGeneration": generation, **status}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )


def add_pod(kube: Client, namespace: str, owner: str, name: str, status: dict[str, Any]) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "llmservice",
                "app.kubernetes.io/instance": owner,
                "app.kubernetes.io/managed-by": "llmservice-operator",
            },
        },
        "spec": {"containers": [{"name": "server", "image": "llm"}]},
    }
    kube.create(from_dict(pod), namespace=namespace)
    kube.patch(Pod.Status, name, {"status": status}, namespace=namespace, patch_type=PatchType.MERGE)


POD_FAILURES = [
    pytest.param(
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        },
        "Unschedulable",
        "Insufficient nvidia.com/gpu",
        id="unschedulable",
    ),
    pytest.param(
        {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "server",
                    "image": "registry.example/llm:nope",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}},
                }
            ],
        },
        "ImagePullBackOff",
        "registry.example/llm:nope",
        id="image-pull",
    ),
    pytest.param(
        {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "server",
                    "image": "llm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "adapter 'support' failed to load: no adapter_config.json",
                        }
                    },
                }
            ],
        },
        "CrashLoopBackOff",
        "adapter 'support' failed to load",
        id="crash-loop",
    ),
    pytest.param(
        {
            "phase": "Pending",
            "initContainerStatuses": [
                {
                    "name": "fetch-model",
                    "image": "llm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {"exitCode": 2, "message": "hf://acme/tiny-llama: 401 gated repo"}
                    },
                }
            ],
        },
        "ModelDownloadFailed",
        "401 gated repo",
        id="download",
    ),
]


@pytest.mark.parametrize(("pod_status", "reason", "message_part"), POD_FAILURES)
def test_status_surfaces_pod_failures(
    kube: Client, namespace: str, pod_status: dict[str, Any], reason: str, message_part: str
) -> None:
    create(kube, namespace, "bot", BASE_SPEC)
    wait_for_children(kube, namespace, "bot")
    deployment_status(kube, namespace, "bot", replicas=1, updatedReplicas=1, readyReplicas=0)
    add_pod(kube, namespace, "bot", "bot-7d9c-abcde", pod_status)

    ready = eventually(lambda: (c := condition(kube, namespace, "bot", "Ready"))["reason"] == reason and c)
    assert ready["status"] == "False"
    assert message_part in ready["message"]
    # A crash loop needs a person; the rest Kubernetes retries until the progress deadline (GitOps tools
    # must keep waiting, not fail the sync).
    stalled = reason == "CrashLoopBackOff"
    degraded = condition(kube, namespace, "bot", "Degraded")
    assert degraded["status"] == str(stalled)
    assert condition(kube, namespace, "bot", "Stalled")["status"] == str(stalled)
    reconciling = condition(kube, namespace, "bot", "Reconciling")
    assert (reconciling["status"], reconciling["reason"]) == (str(not stalled), reason)
    warning = eventually(lambda: [e for e in events(kube, namespace) if e["reason"] == reason])
    assert warning[0]["type"] == "Warning"


def test_ready_when_every_replica_is_ready(kube: Client, namespace: str) -> None:
    create(kube, namespace, "bot", {**BASE_SPEC, "replicas": 2})
    wait_for_children(kube, namespace, "bot")
    deployment_status(
        kube, namespace, "bot", replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1
    )
    progressing = eventually(
        lambda: (
            (c := condition(kube, namespace, "bot", "Progressing"))["status"] == "True"
            and c["message"].startswith("1/2")
            and c
        )
    )
    assert progressing["reason"] == "RolloutInProgress"
    assert condition(kube, namespace, "bot", "Ready")["status"] == "False"

    deployment_status(
        kube, namespace, "bot", replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2
    )
    ready = eventually(lambda: (c := condition(kube, namespace, "bot", "Ready"))["status"] == "True" and c)
    assert ready["reason"] == "AllReplicasReady"
    status = get(kube, LLMServiceResource, namespace, "bot")["status"]
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert condition(kube, namespace, "bot", "Progressing")["status"] == "False"
    assert condition(kube, namespace, "bot", "Degraded")["status"] == "False"
    assert eventually(lambda: [e for e in events(kube, namespace) if e["reason"] == "AllReplicasReady"])


ALL_READY = {"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}


def test_an_edit_is_not_ready_until_its_rollout_has_happened(kube: Client, namespace: str) -> None:
    """The Deployment the watch last delivered is the old generation's, fully rolled out: status written
    right after an edit must not call the new generation Ready (kubectl wait, Argo CD and Flux read it)."""
    create(kube, namespace, "bot", BASE_SPEC)
    wait_for_children(kube, namespace, "bot")
    deployment_status(kube, namespace, "bot", **ALL_READY)
    eventually(lambda: condition(kube, namespace, "bot", "Ready")["status"] == "True")

    written: list[dict[str, Any]] = []  # every status the operator writes, in order (a watch misses none)
    watching = threading.Event()

    def watch() -> None:
        for _, item in kube.watch(LLMServiceResource, namespace=namespace):
            written.append(item.to_dict().get("status") or {})
            watching.set()

    threading.Thread(target=watch, daemon=True).start()
    assert watching.wait(10)
    edit_spec(kube, namespace, "bot", {"serving": {"maxBatchSize": 64}})  # new settings: pods roll

    def for_the_edit() -> list[dict[str, Any]]:
        return [status for status in written if status.get("observedGeneration") == 2]

    eventually(for_the_edit)
    time.sleep(0.5)  # the Deployment's own watch event triggers one more pass
    readiness = {
        (item["status"], item["reason"])
        for status in for_the_edit()
        for item in status["conditions"]
        if item["type"] == "Ready"
    }
    assert readiness == {("False", "RolloutInProgress")}

    deployment_status(kube, namespace, "bot", **ALL_READY)
    eventually(lambda: condition(kube, namespace, "bot", "Ready")["status"] == "True")


def test_invalid_spec_is_degraded_and_nothing_is_half_applied(
    kube: Client, namespace: str, operator: RunningOperator
) -> None:
    create(kube, namespace, "broken", {**BASE_SPEC, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}})
    degraded = eventually(
        lambda: (c := condition(kube, namespace, "broken", "Degraded"))["status"] == "True" and c
    )
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.autoscaling" in degraded["message"]
    assert absent(kube, Deployment, namespace, "broken")
    assert absent(kube, ConfigMap, namespace, "broken-config")
    assert eventually(
        lambda: [
            e for e in events(kube, namespace) if e["reason"] == "InvalidSpec" and e["type"] == "Warning"
        ]
    )

    # A valid service edited into an invalid one keeps its children exactly as they were.
    create(kube, namespace, "good", BASE_SPEC)
    before = wait_for_children(kube, namespace, "good")
    eventually(lambda: get(kube, ConfigMap, namespace, "good-config"))
    edit_spec(kube, namespace, "good", {"gpus": 3, "model": {"source": "s3://bucket/model"}})
    eventually(lambda: condition(kube, namespace, "good", "Degraded")["reason"] == "InvalidSpec")
    after = get(kube, Deployment, namespace, "good")
    assert after["spec"] == before["spec"]
    assert operator.error is None


def test_deleting_the_llmservice_deletes_its_children(kube: Client, namespace: str) -> None:
    create(kube, namespace, "bot", {**BASE_SPEC, "replicas": 2})
    wait_for_children(kube, namespace, "bot")
    eventually(lambda: get(kube, PodDisruptionBudget, namespace, "bot"))

    kube.delete(LLMServiceResource, "bot", namespace=namespace)
    # No finalizer holds it: it is gone at once, and garbage collection takes the children.
    assert absent(kube, LLMServiceResource, namespace, "bot")
    for resource, name in (
        (Deployment, "bot"),
        (Service, "bot"),
        (PodDisruptionBudget, "bot"),
        (ConfigMap, "bot-config"),
    ):
        eventually(lambda resource=resource, name=name: absent(kube, resource, namespace, name))
    # And the operator does not bring them back.
    time.sleep(1)
    assert absent(kube, Deployment, namespace, "bot")


def test_metrics_count_reconciles_and_conditions(
    kube: Client, namespace: str, operator: RunningOperator
) -> None:
    create(kube, namespace, "bot", BASE_SPEC)
    wait_for_children(kube, namespace, "bot")
    eventually(lambda: condition(kube, namespace, "bot", "Ready"))
    registry = operator.metrics_registry
    assert (
        registry.get_sample_value(
            "llmservice_operator_reconciles_total", {"trigger": "change", "result": "ok"}
        )
        >= 1
    )
    assert (
        registry.get_sample_value(
            "llmservice_operator_child_writes_total", {"kind": "Deployment", "action": "created"}
        )
        >= 1
    )
    assert eventually(
        lambda: (
            registry.get_sample_value(
                "llmservice_operator_llmservices", {"condition": "Ready", "status": "False"}
            )
            >= 1
        )
    )
