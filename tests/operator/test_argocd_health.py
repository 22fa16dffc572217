"""The README's Argo CD health check, run as Argo CD runs it (Lua 5.1, the object as global `obj`, a table
with status and message back) over statuses the operator's own status functions write."""

import re
from typing import Any

import pytest
import yaml
from lupa import lua51

from llmservice_operator.conditions import Observation, build_status
from tests.conftest import ROOT

HEALTH_KEY = "resource.customizations.health.serving.llmservice.io_LLMService"
NOW = "2026-01-01T00:00:00Z"


def readme_health_script() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    scripts = [yaml.safe_load(block)[HEALTH_KEY] for block in blocks if HEALTH_KEY in block]
    assert len(scripts) == 1, f"expected one README block with {HEALTH_KEY}, found {len(scripts)}"
    return scripts[0]


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return dict(lua.execute(readme_health_script()))


def llmservice(generation: int, observation: Observation | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "bot", "generation": generation}, "spec": {}}
    if observation is not None:
        obj["status"] = build_status(observation, {}, "sel", "http://bot", NOW)
    return obj


def deployment(desired: int = 1, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": desired},
        "status": {"observedGeneration": 1, "replicas": desired, "updatedReplicas": desired, **status},
    }


READY = deployment(readyReplicas=1, availableReplicas=1)
DEADLINE_PASSED = deployment(
    conditions=[
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "bot-7d9c" has timed out progressing.',
        }
    ]
)
UNSCHEDULABLE = {
    "metadata": {"name": "bot-7d9c-abcde"},
    "status": {
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
}


@pytest.mark.parametrize(
    ("obj", "status", "message"),
    [
        pytest.param(llmservice(2, Observation(2, READY)), "Healthy", "1/1 replicas ready", id="ready"),
        pytest.param(
            llmservice(1, Observation(1, deployment(2))),
            "Progressing",
            "0/2 replicas ready, 2 updated",
            id="rollout-in-progress",
        ),
        pytest.param(
            llmservice(1, Observation(1, deployment(), [UNSCHEDULABLE])),
            "Progressing",
            "pod bot-7d9c-abcde: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            id="unschedulable",
        ),
        pytest.param(
            llmservice(1, Observation(1, DEADLINE_PASSED, [UNSCHEDULABLE])),
            "Degraded",
            'ReplicaSet "bot-7d9c" has timed out progressing; pod bot-7d9c-abcde: 0/3 nodes are available: '
            "3 Insufficient nvidia.com/gpu.",
            id="deadline-exceeded",
        ),
        pytest.param(
            llmservice(4, Observation(4, READY, spec_error="spec.gpus: must be at most 8")),
            "Degraded",
            "spec.gpus: must be at most 8",
            id="invalid-spec",
        ),
        pytest.param(
            llmservice(3, Observation(2, READY)),
            "Progressing",
            "Waiting for the operator to observe generation 3",
            id="stale-observed-generation",
        ),
        pytest.param(
            llmservice(1, None),
            "Progressing",
            "Waiting for the operator to observe generation 1",
            id="no-status-yet",
        ),
    ],
)
def test_argocd_health_of_operator_status(obj: dict[str, Any], status: str, message: str) -> None:
    assert argocd_health(obj) == {"status": status, "message": message}
