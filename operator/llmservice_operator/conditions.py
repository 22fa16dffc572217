"""Pure condition bookkeeping: what the Deployment and its pods say, turned into LLMService status.

Conditions follow the Kubernetes API conventions and kstatus: Ready (normal-true), Progressing and
Degraded (abnormal-true), plus kstatus's own Reconciling and Stalled mirrors of them, so that
`kubectl wait --for=condition=Ready` and Flux judge health without custom scripts (Argo CD runs the
README's, which tests/operator/test_argocd_health.py checks against this module's output).

A problem Kubernetes keeps retrying on its own (a pod waiting for a GPU node, an image pull, a model
download) is still progress: Ready False with its reason, Reconciling True. It stalls (Stalled and
Degraded True, Reconciling False) only once the Deployment's progress deadline has passed, because
Flux fails a health check as soon as it sees Stalled. A problem no retry can fix stalls at once.
Reconciling and Stalled are never True together: kstatus reads whichever it meets first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmservice_operator.adapter_status import adapters_condition

MAX_MESSAGE = 1024
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Reconciling", "Stalled", "AdaptersReady")
IMAGE_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName"}
# Ready False for these is a rollout under way, not a problem worth a Warning event.
ROLLOUT_REASONS = {"Creating", "RolloutInProgress"}


@dataclass(frozen=True)
class Problem:
    """Something that keeps replicas from becoming ready. `transient`: Kubernetes retries it on its own,
    so it needs a person only if it outlasts the Deployment's progress deadline."""

    reason: str
    message: str
    transient: bool = False


@dataclass(frozen=True)
class Observation:
    """What the operator saw in one pass; every field is plain data, so status is a pure function."""

    generation: int | None
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    spec_error: str | None = None
    apply_error: str | None = None
    # Objects with a child's name that the operator did not create (it never takes them over).
    conflict: str | None = None
    # status.adapters (adapter_status.summarize); None: not judged in this pass, the last word stands.
    adapters: list[dict[str, Any]] | None = None


def _clip(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def _exit_detail(terminated: dict[str, Any]) -> str:
    detail = f"exit code {terminated.get('exitCode', '?')}"
    if terminated.get("message"):
        detail += f": {terminated['message'].strip()}"
    elif terminated.get("reason"):
        detail += f" ({terminated['reason']})"
    return detail


def _image_problem(pod_name: str, status: dict[str, Any]) -> Problem | None:
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason not in IMAGE_PULL_REASONS:
        return None
    message = f"pod {pod_name}: cannot pull image {status.get('image')}: {waiting.get('message') or reason}"
    if reason == "InvalidImageName":  # the reference itself cannot be parsed: no retry helps
        return Problem(reason, message)
    # A tag still being pushed, a registry outage or rate limit: the kubelet keeps retrying.
    return Problem("ImagePullBackOff", message, transient=True)


def _init_problem(pod_name: str, status: dict[str, Any]) -> Problem | None:
    problem = _image_problem(pod_name, status)
    if problem:
        return problem
    state = status.get("state") or {}
    terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
    if terminated and terminated.get("exitCode", 0) != 0:
        # A Deployment's pods restart always, so the kubelet retries a failed download with back-off.
        return Problem(
            "ModelDownloadFailed",
            f"pod {pod_name}: init container {status.get('name')} failed with {_exit_detail(terminated)}",
            transient=True,
        )
    return None


def _container_problem(pod_name: str, status: dict[str, Any]) -> Problem | None:
    problem = _image_problem(pod_name, status)
    if problem:
        return problem
    state = status.get("state") or {}
    waiting = state.get("waiting") or {}
    reason = waiting.get("reason")
    if reason == "CreateContainerConfigError":
        return Problem("CreateContainerConfigError", f"pod {pod_name}: {waiting.get('message') or reason}")
    last = (status.get("lastState") or {}).get("terminated")
    if reason == "CrashLoopBackOff":
        # Restarted too, but a server that exits on start (a bad adapter, out of memory) exits again.
        detail = _exit_detail(last) if last else (waiting.get("message") or "restarting")
        return Problem(
            "CrashLoopBackOff", f"pod {pod_name}: the server keeps exiting; last time with {detail}"
        )
    terminated = state.get("terminated")
    if terminated and terminated.get("exitCode", 0) != 0:
        return Problem("ServerExited", f"pod {pod_name}: the server exited with {_exit_detail(terminated)}")
    return None


def _one_pod_problem(pod: dict[str, Any]) -> Problem | None:
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        unschedulable = condition.get("reason") == "Unschedulable" and condition.get("status") == "False"
        if condition.get("type") == "PodScheduled" and unschedulable:
            # Often a GPU node pool scaling up; the scheduler retries when nodes join.
            message = condition.get("message") or "unschedulable"
            return Problem("Unschedulable", f"pod {name}: {message}", transient=True)
    for container in status.get("initContainerStatuses") or []:
        problem = _init_problem(name, container)
        if problem:
            return problem
    for container in status.get("containerStatuses") or []:
        problem = _container_problem(name, container)
        if problem:
            return problem
    return None


def pod_problem(pods: list[dict[str, Any]]) -> Problem | None:
    """The first problem among the pods (by name; one no retry fixes before a transient one), checking
    scheduling, init containers, then the server."""
    live = [pod for pod in pods if not pod.get("metadata", {}).get("deletionTimestamp")]
    problems = [
        problem
        for pod in sorted(live, key=lambda item: item.get("metadata", {}).get("name", ""))
        if (problem := _one_pod_problem(pod))
    ]
    return next((problem for problem in problems if not problem.transient), problems[0] if problems else None)


def deployment_problem(deployment: dict[str, Any]) -> Problem | None:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return Problem("ProgressDeadlineExceeded", condition.get("message") or "rollout did not progress")
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return Problem("ReplicaFailure", condition.get("message") or "pods could not be created")
    return None


def _stall(pod: Problem | None, rollout: Problem | None) -> Problem | None:
    """What needs a person: a pod problem no retry fixes, else the Deployment's own verdict (the progress
    deadline passed, pods cannot be created), with the pod problem that led there."""
    if pod is not None and not pod.transient:
        return pod
    if rollout is None:
        return None
    if pod is None:
        return rollout
    return Problem(rollout.reason, f"{rollout.message.rstrip('.')}; {pod.message}")


@dataclass(frozen=True)
class Verdict:
    ready: bool
    ready_reason: str
    ready_message: str
    progressing: bool
    progressing_reason: str
    progressing_message: str
    degraded: Problem | None


def judge(observation: Observation) -> Verdict:
    if observation.spec_error is not None:
        problem = Problem("InvalidSpec", observation.spec_error)
        return Verdict(
            False,
            problem.reason,
            problem.message,
            False,
            problem.reason,
            "the spec cannot be served; fix it and the operator retries",
            problem,
        )
    if observation.conflict is not None:
        # Only a person can settle who owns the name: stalled until the object goes or is renamed.
        problem = Problem("NameConflict", observation.conflict)
        return Verdict(
            False,
            problem.reason,
            problem.message,
            False,
            problem.reason,
            "waiting for the conflicting objects to be removed",
            problem,
        )
    if observation.apply_error is not None:
        # The operator retries the apply itself (kopf.TemporaryError): still reconciling, not stalled.
        return Verdict(
            False,
            "ApplyFailed",
            observation.apply_error,
            True,
            "ApplyFailed",
            "retrying to apply the children",
            None,
        )
    deployment = observation.deployment
    if deployment is None:
        return Verdict(
            False,
            "Creating",
            "the Deployment does not exist yet",
            True,
            "Creating",
            "creating the Deployment",
            None,
        )

    desired = (deployment.get("spec") or {}).get("replicas", 1)
    status = deployment.get("status") or {}
    updated = status.get("updatedReplicas", 0)
    ready = status.get("readyReplicas", 0)
    available = status.get("availableReplicas", 0)
    total = status.get("replicas", 0)
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = generation is None or status.get("observedGeneration", 0) >= generation

    pod = pod_problem(observation.pods)
    # Conditions of a generation the Deployment controller has not seen yet describe the last rollout.
    rollout = deployment_problem(deployment) if observed else None
    progress = f"{ready}/{desired} replicas ready, {updated} updated"

    if observed and desired == 0 and total == 0:
        return Verdict(
            True,
            "ScaledToZero",
            "scaled to 0 replicas; requests fail until it is scaled up",
            False,
            "ScaledToZero",
            "no replicas requested",
            None,
        )
    if observed and updated >= desired and ready >= desired and available >= desired and total == updated:
        return Verdict(
            True,
            "AllReplicasReady",
            f"{ready}/{desired} replicas ready",
            False,
            "RolloutComplete",
            f"{ready}/{desired} replicas ready",
            None,
        )
    cause = pod or rollout
    if cause is None:
        return Verdict(False, "RolloutInProgress", progress, True, "RolloutInProgress", progress, None)
    stall = _stall(pod, rollout)
    if stall is None:
        waiting = f"{progress}; Kubernetes retries until the Deployment's progress deadline"
        return Verdict(False, cause.reason, cause.message, True, cause.reason, waiting, None)
    return Verdict(False, cause.reason, cause.message, False, stall.reason, progress, stall)


def _condition(
    previous: dict[str, dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(kind)
    since = before["lastTransitionTime"] if before and before.get("status") == value else now
    condition: dict[str, Any] = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": _clip(message),
        "lastTransitionTime": since,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def build_conditions(
    observation: Observation, previous: list[dict[str, Any]], now: str
) -> list[dict[str, Any]]:
    verdict = judge(observation)
    known = {item["type"]: item for item in previous if item.get("type") in CONDITION_TYPES}
    generation = observation.generation
    degraded = verdict.degraded
    degraded_reason = degraded.reason if degraded else "AsExpected"
    degraded_message = degraded.message if degraded else "no problems found"
    conditions = [
        _condition(
            known, "Ready", verdict.ready, verdict.ready_reason, verdict.ready_message, generation, now
        ),
        _condition(
            known,
            "Progressing",
            verdict.progressing,
            verdict.progressing_reason,
            verdict.progressing_message,
            generation,
            now,
        ),
        _condition(
            known, "Degraded", degraded is not None, degraded_reason, degraded_message, generation, now
        ),
        _condition(
            known,
            "Reconciling",
            verdict.progressing,
            verdict.progressing_reason,
            verdict.progressing_message,
            generation,
            now,
        ),
        _condition(
            known, "Stalled", degraded is not None, degraded_reason, degraded_message, generation, now
        ),
    ]
    # About the adapters only: Ready stays about the base model (one broken adapter must not take a
    # serving model out of `kubectl wait` and health checks).
    if observation.adapters is not None:
        status, reason, message = adapters_condition(observation.adapters)
        conditions.append(_condition(known, "AdaptersReady", status, reason, message, generation, now))
    elif "AdaptersReady" in known:
        conditions.append(known["AdaptersReady"])
    return conditions


def build_status(
    observation: Observation, previous_status: dict[str, Any], selector: str, url: str, now: str
) -> dict[str, Any]:
    deployment_status = (observation.deployment or {}).get("status") or {}
    return {
        "observedGeneration": observation.generation,
        "replicas": deployment_status.get("replicas", 0),
        "readyReplicas": deployment_status.get("readyReplicas", 0),
        "selector": selector,
        "url": url,
        "adapters": (
            observation.adapters if observation.adapters is not None else previous_status.get("adapters", [])
        ),
        "conditions": build_conditions(observation, previous_status.get("conditions") or [], now),
    }


def status_changes(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The status fields to patch; empty when nothing changed, so a no-op pass writes nothing."""
    return {key: value for key, value in desired.items() if current.get(key) != value}


def condition_events(
    previous: list[dict[str, Any]], current: list[dict[str, Any]]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of events worth telling the user: Ready turning True, each new problem
    (Ready False for a reason other than a rollout under way) and Degraded turning True."""
    before = {item["type"]: item for item in previous}
    events = []
    for condition in current:
        old = before.get(condition["type"], {})
        changed = old.get("status") != condition["status"] or old.get("reason") != condition["reason"]
        if not changed:
            continue
        kind, true = condition["type"], condition["status"] == "True"
        new_problem = kind == "Ready" and not true and condition["reason"] not in ROLLOUT_REASONS
        if kind == "Ready" and true:
            events.append(("Normal", condition["reason"], condition["message"]))
        elif new_problem or (kind == "Degraded" and true):
            events.append(("Warning", condition["reason"], condition["message"]))
    # A problem that stalls at once is both Ready's reason and Degraded's: one event says it.
    return list(dict.fromkeys(events))
