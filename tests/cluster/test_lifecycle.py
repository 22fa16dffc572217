"""An LLMService's life on a real control plane: the real controllers, scheduler and garbage collector
act on what the operator writes, kwok plays the kubelets, and every check reads the real API server."""

import json
import re
import time

from tests.cluster.conftest import Kube, llmservice
from tests.operator.harness import eventually

CHILD_KINDS = ("configmap", "deployment", "service", "hpa", "pdb", "networkpolicy")


def owned_by(body: dict, owner: dict) -> bool:
    refs = body["metadata"].get("ownerReferences") or []
    return any(ref["uid"] == owner["metadata"]["uid"] and ref.get("controller") for ref in refs)


def running_pods(kube: Kube, name: str) -> list[dict]:
    pods = kube.items("pods", "-l", f"app.kubernetes.io/instance={name}")
    return [
        pod
        for pod in pods
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
    ]


def printed_columns(table: str) -> dict[str, str]:
    """kubectl's table by its header's column positions (an empty cell, e.g. ADAPTERS, is blank)."""
    header, row = table.splitlines()
    cells = list(re.finditer(r"\S+", header))
    ends = [cell.start() for cell in cells[1:]] + [None]
    return {cell.group(): row[cell.start() : end].strip() for cell, end in zip(cells, ends, strict=True)}


def test_create_runs_pods_and_reports_ready(kube: Kube) -> None:
    kube.apply(
        llmservice(
            "bot",
            gpus=1,
            autoscaling={"minReplicas": 1, "maxReplicas": 3},
            networkPolicy={"enabled": True, "ingressFrom": [{"podSelector": {}}]},
        )
    )
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
    owner = kube.get("llms", "bot")
    assert owner is not None
    for kind in CHILD_KINDS:
        child = kube.get(kind, "bot-config" if kind == "configmap" else "bot")
        assert child is not None, kind
        assert owned_by(child, owner), kind
    (replica_set,) = kube.items("replicasets", "-l", "app.kubernetes.io/instance=bot")
    assert replica_set["status"]["readyReplicas"] == 1
    (pod,) = running_pods(kube, "bot")
    assert pod["spec"]["nodeName"] in {"gpu-0", "gpu-1"}  # the GPU request and the taint's toleration

    columns = printed_columns(kube.run("get", "llms", "bot"))
    assert columns["MODEL"] == "hf://acme/llama"
    assert (columns["GPUS"], columns["READY-REPLICAS"], columns["DESIRED"], columns["READY"]) == (
        "1",
        "1",
        "1",
        "True",
    )
    assert columns["URL"] == f"http://bot.{kube.namespace}.svc.cluster.local"


def test_kubectl_scale_gives_three_pods(kube: Kube) -> None:
    kube.apply(llmservice("bot", gpus=1))
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
    kube.run("scale", "llms/bot", "--replicas=3")
    eventually(lambda: len(running_pods(kube, "bot")) == 3, timeout=60)
    kube.run("wait", "llms/bot", "--for=jsonpath={.status.readyReplicas}=3", "--timeout=60s")
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")


def test_more_gpus_than_any_node_has_is_unschedulable_and_transient(kube: Kube) -> None:
    kube.apply(llmservice("big", gpus=4))
    ready = kube.wait_for_reason("big", "Unschedulable")
    assert ready["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in ready["message"]  # the scheduler's own words
    assert kube.condition("big", "Reconciling")["status"] == "True"
    assert kube.condition("big", "Stalled")["status"] == "False"


def test_an_image_that_does_not_pull_is_reported(kube: Kube) -> None:
    kube.apply(llmservice("pull", gpus=1, image="pull-fails.invalid/llm-server:0.1.0"))
    ready = kube.wait_for_reason("pull", "ImagePullBackOff")
    assert "pull-fails.invalid/llm-server:0.1.0" in ready["message"]
    assert kube.condition("pull", "Stalled")["status"] == "False"


def test_a_crash_loop_is_reported_with_its_exit(kube: Kube) -> None:
    kube.apply(llmservice("crash", gpus=1, image="crash-loops.invalid/llm-server:0.1.0"))
    ready = kube.wait_for_reason("crash", "CrashLoopBackOff")
    assert "exit code 1" in ready["message"]
    assert "model failed to load" in ready["message"]


def test_hand_edits_and_deletions_of_children_are_repaired(kube: Kube) -> None:
    kube.apply(llmservice("bot", gpus=1))
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
    deployment = kube.get("deployment", "bot")
    assert deployment is not None
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]

    kube.run("delete", "service", "bot")
    eventually(lambda: kube.get("service", "bot") is not None, timeout=30)
    kube.run("set", "image", "deployment/bot", "server=hand-edited.invalid/x:1")
    eventually(
        lambda: kube.get("deployment", "bot")["spec"]["template"]["spec"]["containers"][0]["image"] == image,
        timeout=30,
    )
    kube.run("patch", "configmap", "bot-config", "--type=merge", "-p", '{"data": {"LLM_PORT": "9999"}}')
    eventually(lambda: kube.get("configmap", "bot-config")["data"]["LLM_PORT"] == "8000", timeout=30)


def operator_writes(kube: Kube) -> dict[str, object]:
    """What the operator has written: the LLMServices whole (nobody else writes them), the operator's
    managed-fields entries of each child (controllers keep writing HPA and Deployment status), and
    the events in the namespace."""
    writes: dict[str, object] = {}
    for item in kube.items("llms"):
        writes[f"llms/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    for kind in CHILD_KINDS:
        for item in kube.items(kind, "--show-managed-fields"):
            entries = item["metadata"].get("managedFields") or []
            ours = [e for e in entries if e["manager"].startswith("llmservice-operator")]
            writes[f"{kind}/{item['metadata']['name']}"] = ours
    writes["events"] = sorted(
        event["metadata"]["name"]
        for event in kube.items("events")
        if event["involvedObject"]["kind"] == "LLMService"
    )
    return writes


def test_an_operator_restart_writes_nothing(kube: Kube) -> None:
    kube.apply(llmservice("bot", gpus=1, autoscaling={"maxReplicas": 2}))
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
    time.sleep(2)  # let the last status write and its echo settle
    before = operator_writes(kube)
    kube.cluster.stop_process("operator")
    requests_before = len(kube.cluster.operator_requests())
    kube.cluster.start_operator()
    time.sleep(5)  # kopf has listed, resumed every LLMService and handled the replayed child events
    assert operator_writes(kube) == before
    # The API server's own record: not even a write that changes nothing (a same-value status patch).
    writes = [
        f"{event['verb']} {event['requestURI']}"
        for event in kube.cluster.operator_requests()[requests_before:]
        if event["verb"] in {"create", "update", "patch", "delete"}
        and event.get("objectRef", {}).get("namespace") == kube.namespace
    ]
    assert writes == []


def test_deleting_the_llmservice_garbage_collects_its_children(kube: Kube) -> None:
    kube.apply(llmservice("bot", gpus=1, autoscaling={"maxReplicas": 2}))
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
    kube.run("delete", "llms/bot", "--wait=true", "--timeout=30s")
    for kind in (*CHILD_KINDS, "pods"):
        eventually(
            lambda kind=kind: kube.items(kind, "-l", "app.kubernetes.io/instance=bot") == [], timeout=60
        )


def test_an_orphaning_delete_leaves_the_children_unowned(kube: Kube) -> None:
    kube.apply(llmservice("bot", gpus=1))
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
    kube.run("delete", "llms/bot", "--cascade=orphan", "--wait=true", "--timeout=30s")
    eventually(lambda: kube.get("llms", "bot") is None, timeout=30)
    time.sleep(5)  # time for a wrongly restored owner reference, and for the collector to act on it
    for kind in ("configmap", "deployment", "service"):
        child = kube.get(kind, "bot-config" if kind == "configmap" else "bot")
        assert child is not None, kind
        assert not child["metadata"].get("ownerReferences"), kind
    assert len(running_pods(kube, "bot")) == 1


def replicas_owners(deployment: dict) -> set[tuple[str, str]]:
    """(manager, operation) of every managed-fields entry that owns spec.replicas."""
    return {
        (entry["manager"], entry["operation"])
        for entry in deployment["metadata"].get("managedFields") or []
        if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
    }


def watch_replicas(kube: Kube, name: str, seconds: float) -> list[int]:
    """spec.replicas of the Deployment, sampled for `seconds`."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        deployment = kube.get("deployment", name)
        assert deployment is not None
        seen.append(deployment["spec"]["replicas"])
    return seen


def test_autoscaling_on_without_a_dip_and_off_keeping_the_live_count(kube: Kube) -> None:
    kube.apply(llmservice("bot", gpus=1, replicas=2))
    kube.run("wait", "llms/bot", "--for=jsonpath={.status.readyReplicas}=2", "--timeout=60s")
    before = kube.get("deployment", "bot")
    assert before is not None and ("llmservice-operator", "Apply") in replicas_owners(before)

    # On: the HPA takes spec.replicas over; the operator's apply lets go of it without it falling to 1.
    kube.run(
        "patch",
        "llms/bot",
        "--type=merge",
        "-p",
        '{"spec": {"replicas": null, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}}',
    )
    eventually(lambda: kube.get("hpa", "bot") is not None, timeout=30)
    assert min(watch_replicas(kube, "bot", 4)) == 2  # the HPA keeps 2 (within its bounds); no dip
    after = kube.get("deployment", "bot")
    assert after is not None
    assert ("llmservice-operator", "Apply") not in replicas_owners(after)
    assert ("llmservice-operator-handover", "Apply") in replicas_owners(after)

    # The HPA raises the floor to 3; then autoscaling goes away with spec.replicas unset: 3 stay.
    kube.run(
        "patch",
        "llms/bot",
        "--type=merge",
        "-p",
        '{"spec": {"autoscaling": {"minReplicas": 3, "maxReplicas": 4}}}',
    )
    eventually(lambda: kube.get("deployment", "bot")["spec"]["replicas"] == 3, timeout=60)
    # The LLMService says so too: spec.replicas follows the HPA, and /scale reads it.
    eventually(lambda: kube.get("llms", "bot")["spec"]["replicas"] == 3, timeout=30)
    scale = json.loads(kube.run("get", "llms", "bot", "--subresource=scale", "-o", "json"))
    assert scale["spec"]["replicas"] == 3
    kube.run("patch", "llms/bot", "--type=merge", "-p", '{"spec": {"autoscaling": null}}')
    eventually(lambda: kube.get("hpa", "bot") is None, timeout=30)
    assert set(watch_replicas(kube, "bot", 4)) == {3}
    kube.run("wait", "llms/bot", "--for=jsonpath={.status.readyReplicas}=3", "--timeout=60s")

    # kubectl scale still works afterwards, and the operator owns the count again.
    kube.run("scale", "llms/bot", "--replicas=1")
    eventually(lambda: kube.get("deployment", "bot")["spec"]["replicas"] == 1, timeout=30)


def test_an_object_the_operator_did_not_create_is_not_taken_over(kube: Kube) -> None:
    kube.run("create", "configmap", "bot-config", "--from-literal=owner=someone-else")
    kube.apply(llmservice("bot", gpus=1))
    ready = kube.wait_for_reason("bot", "NameConflict")
    assert "ConfigMap bot-config" in ready["message"]
    assert kube.condition("bot", "Stalled")["status"] == "True"
    foreign = kube.get("configmap", "bot-config")
    assert foreign is not None
    assert foreign["data"] == {"owner": "someone-else"} and not foreign["metadata"].get("ownerReferences")
    assert kube.get("deployment", "bot") is None  # nothing half-applied around the conflict

    kube.run("delete", "configmap", "bot-config")
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=60s")
