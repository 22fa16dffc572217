"""Status as a pure function of what the Deployment and its pods say."""

import pytest

from llmservice_operator.conditions import (
    Observation,
    build_conditions,
    build_status,
    condition_events,
    judge,
    status_changes,
)

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def deployment(desired: int = 2, generation: int = 1, observed: int = 1, **status: int) -> dict:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {"observedGeneration": observed, **status},
    }


def by_type(conditions: list[dict]) -> dict[str, dict]:
    return {item["type"]: item for item in conditions}


def pod(name: str = "bot-1", **status: object) -> dict:
    return {"metadata": {"name": name}, "status": status}


def deadline_passed(deployment: dict) -> dict:
    deployment["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "bot-7d9c" has timed out progressing.',
        }
    ]
    return deployment


def waiting(reason: str, message: str = "", **extra: object) -> dict:
    return {
        "name": "server",
        "image": "registry.example/llm:1",
        "state": {"waiting": {"reason": reason, "message": message}},
        **extra,
    }


UNSCHEDULABLE = pod(
    phase="Pending",
    conditions=[
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ],
)
FAILED_DOWNLOAD = {
    "name": "fetch-model",
    "restartCount": 2,
    "lastState": {"terminated": {"exitCode": 2, "message": "hf://acme/tiny: 503 Service Unavailable"}},
}
# What the kubelet reports while it waits out an image pull or a failed download; it retries each.
TRANSIENT = [
    pytest.param(UNSCHEDULABLE, "Unschedulable", "Insufficient nvidia.com/gpu", id="unschedulable"),
    pytest.param(
        pod(containerStatuses=[waiting("ErrImagePull", "dial tcp: i/o timeout")]),
        "ImagePullBackOff",
        "registry.example/llm:1",
        id="err-image-pull",
    ),
    pytest.param(
        pod(initContainerStatuses=[waiting("ImagePullBackOff", "Back-off pulling image")]),
        "ImagePullBackOff",
        "Back-off pulling image",
        id="init-image-pull-back-off",
    ),
    pytest.param(
        pod(
            initContainerStatuses=[{**FAILED_DOWNLOAD, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]
        ),
        "ModelDownloadFailed",
        "503 Service Unavailable",
        id="download-backing-off",
    ),
    pytest.param(
        pod(initContainerStatuses=[{**FAILED_DOWNLOAD, "state": {"running": {}}}]),
        "ModelDownloadFailed",
        "503 Service Unavailable",
        id="download-retrying",
    ),
]
# What no retry fixes: these stall at once.
HARD = [
    pytest.param(
        pod(
            containerStatuses=[
                waiting(
                    "CrashLoopBackOff",
                    "back-off 40s",
                    lastState={"terminated": {"exitCode": 1, "message": "adapter 'support' failed to load"}},
                )
            ]
        ),
        "CrashLoopBackOff",
        id="crash-loop",
    ),
    pytest.param(
        pod(containerStatuses=[waiting("CreateContainerConfigError", 'secret "keys" not found')]),
        "CreateContainerConfigError",
        id="missing-secret",
    ),
    pytest.param(
        pod(containerStatuses=[waiting("InvalidImageName", 'failed to parse image name "llm::1"')]),
        "InvalidImageName",
        id="invalid-image-name",
    ),
]


def test_no_deployment_yet_is_progressing() -> None:
    conditions = by_type(build_conditions(Observation(1), [], NOW))
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Creating")
    assert conditions["Progressing"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "False"
    assert [item["type"] for item in build_conditions(Observation(1), [], NOW)] == [
        "Ready",
        "Progressing",
        "Degraded",
        "Reconciling",
        "Stalled",
    ]


def test_rollout_complete_is_ready() -> None:
    verdict = judge(
        Observation(3, deployment(2, replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2))
    )
    assert (verdict.ready, verdict.ready_reason, verdict.ready_message) == (
        True,
        "AllReplicasReady",
        "2/2 replicas ready",
    )
    assert not verdict.progressing and verdict.degraded is None


def test_old_pods_or_an_unobserved_generation_are_not_ready() -> None:
    surging = deployment(2, replicas=3, updatedReplicas=2, readyReplicas=2, availableReplicas=2)
    assert judge(Observation(1, surging)).ready is False
    stale = deployment(
        2, generation=4, observed=3, replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2
    )
    assert judge(Observation(1, stale)).ready_reason == "RolloutInProgress"


def test_scaled_to_zero_is_ready_and_says_so() -> None:
    verdict = judge(Observation(1, deployment(0)))
    assert (verdict.ready, verdict.ready_reason) == (True, "ScaledToZero")


def test_problems_stall_and_explain() -> None:
    pod = {
        "metadata": {"name": "bot-1"},
        "status": {
            "containerStatuses": [
                {
                    "name": "server",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "keys" not found',
                        }
                    },
                }
            ]
        },
    }
    verdict = judge(Observation(1, deployment(1, replicas=1, updatedReplicas=1), [pod]))
    assert verdict.degraded is not None
    assert verdict.degraded.reason == "CreateContainerConfigError"
    assert 'secret "keys" not found' in verdict.ready_message
    conditions = by_type(build_conditions(Observation(1, deployment(1, replicas=1), [pod]), [], NOW))
    assert conditions["Stalled"]["status"] == "True" and conditions["Reconciling"]["status"] == "False"


def test_progress_deadline_and_quota_come_from_the_deployment() -> None:
    stuck = deployment(1, replicas=1)
    stuck["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "bot-1" has timed out progressing.',
        }
    ]
    assert judge(Observation(1, stuck)).degraded.reason == "ProgressDeadlineExceeded"
    quota = deployment(1)
    quota["status"]["conditions"] = [
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": "exceeded quota: gpus",
        }
    ]
    assert "exceeded quota" in judge(Observation(1, quota)).degraded.message


def test_invalid_spec_wins_over_everything() -> None:
    ready = deployment(1, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)
    verdict = judge(Observation(2, ready, spec_error="spec.gpus: must be at most 8"))
    assert (verdict.ready, verdict.ready_reason, verdict.degraded.reason) == (
        False,
        "InvalidSpec",
        "InvalidSpec",
    )


def test_transition_time_moves_only_when_status_flips() -> None:
    first = build_conditions(Observation(1), [], NOW)
    same = build_conditions(Observation(1, deployment(2, replicas=2, updatedReplicas=2)), first, LATER)
    assert by_type(same)["Ready"]["lastTransitionTime"] == NOW  # still False, reason changed
    flipped = build_conditions(
        Observation(1, deployment(1, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)),
        first,
        LATER,
    )
    assert by_type(flipped)["Ready"]["lastTransitionTime"] == LATER


def test_long_messages_are_clipped() -> None:
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [
                {"name": "server", "state": {"terminated": {"exitCode": 1, "message": "x" * 5000}}}
            ]
        },
    }
    message = judge(Observation(1, deployment(1), [pod])).ready_message
    assert len(message) > 1000
    assert (
        len(by_type(build_conditions(Observation(1, deployment(1), [pod]), [], NOW))["Ready"]["message"])
        == 1024
    )


def test_status_fields_and_changes() -> None:
    observation = Observation(2, deployment(2, replicas=2, readyReplicas=1))
    status = build_status(observation, {}, "sel", "http://bot", NOW)
    assert {
        key: status[key] for key in ("observedGeneration", "replicas", "readyReplicas", "selector", "url")
    } == {"observedGeneration": 2, "replicas": 2, "readyReplicas": 1, "selector": "sel", "url": "http://bot"}
    assert status_changes(status, build_status(observation, status, "sel", "http://bot", LATER)) == {}
    assert set(status_changes(status, {**status, "readyReplicas": 2})) == {"readyReplicas"}


def test_events_on_ready_and_on_new_problems_only() -> None:
    before = build_conditions(Observation(1), [], NOW)
    ready = build_conditions(
        Observation(1, deployment(1, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)),
        before,
        NOW,
    )
    assert condition_events(before, ready) == [("Normal", "AllReplicasReady", "1/1 replicas ready")]
    assert condition_events(ready, ready) == []
    broken = build_conditions(Observation(2, spec_error="spec.gpus: bad"), ready, NOW)
    assert condition_events(ready, broken) == [("Warning", "InvalidSpec", "spec.gpus: bad")]


def rolling(desired: int = 1) -> dict:
    return deployment(desired, replicas=desired, updatedReplicas=desired)


@pytest.mark.parametrize(("problem_pod", "reason", "message_part"), TRANSIENT)
def test_problems_kubernetes_retries_are_reconciling_not_stalled(
    problem_pod: dict, reason: str, message_part: str
) -> None:
    conditions = by_type(build_conditions(Observation(1, rolling(), [problem_pod]), [], NOW))
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", reason)
    assert message_part in conditions["Ready"]["message"]
    for kind in ("Reconciling", "Progressing"):
        assert (conditions[kind]["status"], conditions[kind]["reason"]) == ("True", reason)
        assert "progress deadline" in conditions[kind]["message"]
    for kind in ("Stalled", "Degraded"):
        assert (conditions[kind]["status"], conditions[kind]["reason"]) == ("False", "AsExpected")


@pytest.mark.parametrize(("problem_pod", "reason", "message_part"), TRANSIENT)
def test_they_stall_once_the_progress_deadline_has_passed(
    problem_pod: dict, reason: str, message_part: str
) -> None:
    stuck = deadline_passed(rolling())
    conditions = by_type(build_conditions(Observation(1, stuck, [problem_pod]), [], NOW))
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", reason)
    for kind in ("Stalled", "Degraded"):
        assert (conditions[kind]["status"], conditions[kind]["reason"]) == (
            "True",
            "ProgressDeadlineExceeded",
        )
        assert 'ReplicaSet "bot-7d9c" has timed out progressing; pod bot-1: ' in conditions[kind]["message"]
        assert message_part in conditions[kind]["message"]
    for kind in ("Reconciling", "Progressing"):
        assert (conditions[kind]["status"], conditions[kind]["reason"]) == (
            "False",
            "ProgressDeadlineExceeded",
        )


def test_a_deadline_of_a_generation_the_deployment_has_not_observed_does_not_stall() -> None:
    """Right after an edit the applied Deployment still carries the last rollout's conditions."""
    edited = deadline_passed(deployment(1, generation=5, observed=4, replicas=1, updatedReplicas=1))
    conditions = by_type(build_conditions(Observation(2, edited, [UNSCHEDULABLE]), [], NOW))
    assert (conditions["Reconciling"]["status"], conditions["Stalled"]["status"]) == ("True", "False")


@pytest.mark.parametrize(("problem_pod", "reason"), HARD)
def test_problems_no_retry_fixes_stall_at_once(problem_pod: dict, reason: str) -> None:
    conditions = by_type(build_conditions(Observation(1, rolling(), [problem_pod]), [], NOW))
    assert conditions["Ready"]["reason"] == reason
    for kind in ("Stalled", "Degraded"):
        assert (conditions[kind]["status"], conditions[kind]["reason"]) == ("True", reason)
    assert conditions["Reconciling"]["status"] == "False"


def test_a_transient_problem_does_not_hide_a_hard_one() -> None:
    crashing = pod("bot-2", containerStatuses=[waiting("CrashLoopBackOff", "back-off 40s")])
    verdict = judge(Observation(1, rolling(2), [UNSCHEDULABLE, crashing]))
    assert (verdict.ready_reason, verdict.degraded.reason) == ("CrashLoopBackOff", "CrashLoopBackOff")


def test_a_failed_apply_is_retried_so_it_is_reconciling() -> None:
    conditions = by_type(
        build_conditions(Observation(1, rolling(), apply_error="etcdserver: timeout"), [], NOW)
    )
    assert (conditions["Ready"]["reason"], conditions["Ready"]["message"]) == (
        "ApplyFailed",
        "etcdserver: timeout",
    )
    assert (conditions["Reconciling"]["status"], conditions["Stalled"]["status"]) == ("True", "False")


SITUATIONS = [
    Observation(1),
    Observation(1, rolling(2)),
    Observation(1, deployment(1, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)),
    Observation(1, deployment(0)),
    Observation(1, deadline_passed(rolling())),
    Observation(1, rolling(), apply_error="conflict"),
    Observation(1, rolling(), spec_error="spec.gpus: bad"),
    *(Observation(1, rolling(), [param.values[0]]) for param in TRANSIENT + HARD),
    *(Observation(1, deadline_passed(rolling()), [param.values[0]]) for param in TRANSIENT),
]


@pytest.mark.parametrize("observation", SITUATIONS)
def test_kstatus_sees_exactly_one_of_current_reconciling_stalled(observation: Observation) -> None:
    """kstatus ignores Ready: it reads Reconciling, then Stalled, and with neither True calls the object
    Current. So a service that is not Ready must say which of the two it is, and never both."""
    conditions = by_type(build_conditions(observation, [], NOW))
    flags = [conditions[kind]["status"] == "True" for kind in ("Ready", "Reconciling", "Stalled")]
    assert flags.count(True) == 1
    strip = ("status", "reason", "message")
    assert [conditions["Degraded"][key] for key in strip] == [conditions["Stalled"][key] for key in strip]
    assert [conditions["Progressing"][key] for key in strip] == [
        conditions["Reconciling"][key] for key in strip
    ]


def test_events_tell_a_transient_problem_and_then_its_stall() -> None:
    before = build_conditions(Observation(1, rolling()), [], NOW)
    waiting_for_gpu = build_conditions(Observation(1, rolling(), [UNSCHEDULABLE]), before, NOW)
    assert condition_events(before, waiting_for_gpu) == [
        ("Warning", "Unschedulable", "pod bot-1: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    ]
    stalled = build_conditions(
        Observation(1, deadline_passed(rolling()), [UNSCHEDULABLE]), waiting_for_gpu, NOW
    )
    assert [event[:2] for event in condition_events(waiting_for_gpu, stalled)] == [
        ("Warning", "ProgressDeadlineExceeded")
    ]
