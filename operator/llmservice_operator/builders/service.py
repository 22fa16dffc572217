"""The ClusterIP Service in front of the model pods."""

from typing import Any

from llmservice_operator.builders.common import metadata, selector_labels
from llmservice_operator.constants import SERVER_PORT_NAME, SERVICE_PORT
from llmservice_operator.spec import LLMService


def build_service(svc: LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(svc),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(svc),
            "ports": [
                {
                    "name": SERVER_PORT_NAME,
                    "port": SERVICE_PORT,
                    "targetPort": SERVER_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def service_url(name: str, namespace: str, cluster_domain: str) -> str:
    return f"http://{name}.{namespace}.svc.{cluster_domain}"
