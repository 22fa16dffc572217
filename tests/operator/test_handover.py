"""Which Deployments hand spec.replicas over before autoscaling is applied (see handover.py)."""

from typing import Any

from llmservice_operator.handover import HANDOVER_FIELD_MANAGER, handover_manifest, replicas_to_hand_over
from llmservice_operator.replicas import replicas_to_record
from llmservice_operator.spec import LLMServiceSpec, parse_spec

AUTOSCALED: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "chat", "namespace": "ml"},
    "spec": {"selector": {"matchLabels": {"app": "chat"}}},  # no replicas: the HPA owns them
}


def live(replicas: int, *owners: tuple[str, str]) -> dict[str, Any]:
    """A Deployment as the API server returns it: managedFields name who set spec.replicas, and how."""
    return {
        "metadata": {
            "name": "chat",
            "managedFields": [
                {
                    "manager": manager,
                    "operation": operation,
                    "apiVersion": "apps/v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}},
                }
                for manager, operation in owners
            ]
            + [{"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {"replicas": replicas},
    }


def test_the_operators_replica_count_is_handed_over_when_autoscaling_turns_on() -> None:
    assert replicas_to_hand_over(AUTOSCALED, live(8, ("llmservice-operator", "Apply"))) == 8
    assert handover_manifest(AUTOSCALED, 8) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"replicas": 8},
    }
    assert HANDOVER_FIELD_MANAGER != "llmservice-operator"


def test_nothing_to_hand_over_once_someone_else_owns_the_count_or_the_operator_keeps_it() -> None:
    # The HPA (the controller manager, through the scale subresource) took it over already.
    assert replicas_to_hand_over(AUTOSCALED, live(5, ("kube-controller-manager", "Update"))) is None
    # Handed over on an earlier pass: the operator no longer owns it.
    assert replicas_to_hand_over(AUTOSCALED, live(8, (HANDOVER_FIELD_MANAGER, "Apply"))) is None
    # Without autoscaling the operator keeps sending replicas itself.
    fixed = {**AUTOSCALED, "spec": {**AUTOSCALED["spec"], "replicas": 3}}
    assert replicas_to_hand_over(fixed, live(8, ("llmservice-operator", "Apply"))) is None
    assert replicas_to_hand_over(AUTOSCALED, None) is None


class TestReplicasToRecord:
    """While autoscaling is on, spec.replicas follows the HPA's count (replicas.py)."""

    @staticmethod
    def spec(**fields: object) -> LLMServiceSpec:
        return parse_spec({"model": {"source": "hf://acme/llama"}, **fields})

    def test_the_hpas_count_is_copied_while_autoscaling(self) -> None:
        autoscaled = self.spec(autoscaling={"maxReplicas": 4})
        assert replicas_to_record(autoscaled, {"spec": {"replicas": 3}}) == 3
        assert (
            replicas_to_record(
                self.spec(replicas=3, autoscaling={"maxReplicas": 4}), {"spec": {"replicas": 3}}
            )
            is None
        )
        assert replicas_to_record(autoscaled, {"spec": {}}) is None
        assert replicas_to_record(autoscaled, None) is None

    def test_nothing_is_copied_without_autoscaling(self) -> None:
        assert replicas_to_record(self.spec(replicas=1), {"spec": {"replicas": 3}}) is None
