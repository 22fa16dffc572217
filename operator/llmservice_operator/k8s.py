"""The only module that writes to the API server itself (reads come from kopf's indexes; kopf writes
its own progress annotations and events)."""

from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import ConfigMap, Service
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from llmservice_operator.constants import FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION

LLMServiceResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)

RESOURCES: dict[tuple[str, str], type[NamespacedResource]] = {
    ("v1", "ConfigMap"): ConfigMap,
    ("v1", "Service"): Service,
    ("apps/v1", "Deployment"): Deployment,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): HorizontalPodAutoscaler,
    ("policy/v1", "PodDisruptionBudget"): PodDisruptionBudget,
}


class ChildWriter:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @classmethod
    def from_environment(cls) -> "ChildWriter":
        """In-cluster service account, else $KUBECONFIG or ~/.kube/config (as kopf's own login does)."""
        return cls(AsyncClient(config=KubeConfig.from_env(), field_manager=FIELD_MANAGER))

    async def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply with a fixed field manager: creates, updates, and drops fields no longer sent."""
        resource = RESOURCES[(manifest["apiVersion"], manifest["kind"])]
        meta = manifest["metadata"]
        await self._client.patch(
            resource,
            meta["name"],
            manifest,
            namespace=meta["namespace"],
            patch_type=PatchType.APPLY,
            field_manager=FIELD_MANAGER,
            force=True,
        )

    async def delete(self, api_version: str, kind: str, name: str, namespace: str) -> bool:
        """False when it was already gone."""
        try:
            await self._client.delete(RESOURCES[(api_version, kind)], name, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return True

    async def owner_alive(self, namespace: str, name: str, uid: str) -> bool:
        """Whether the LLMService still exists (as the same object) before a child is recreated for it."""
        try:
            owner = await self._client.get(LLMServiceResource, name, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return owner.metadata.uid == uid and owner.metadata.deletionTimestamp is None

    async def patch_status(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        """A merge patch of the status subresource (for passes started by a child's event)."""
        await self._client.patch(
            LLMServiceResource.Status,
            name,
            {"status": changes},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )

    async def close(self) -> None:
        await self._client.close()
