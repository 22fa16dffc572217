"""Status as a pure function of what the Deployment and its pods say."""

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
