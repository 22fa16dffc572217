"""The only module that writes to the API server itself (reads come from kopf's indexes; kopf writes
its own progress annotations and events).

Requests the API server answers with "try again" (409 Conflict, 429 Too Many Requests, 5xx) are
retried here a few times within about two seconds, honouring Retry-After, as client-go does for its
controllers: every write is idempotent (server-side apply of the whole object, a merge patch of
status, a delete), so repeating one is safe. Only what outlasts these retries reaches the reconciler,
which reports ApplyFailed and has the pass run again later.
"""

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from lightkube import ApiError, AsyncClient, KubeConfig, operators
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import ConfigMap, Secret, Service
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType
from prometheus_client import Counter

from llmservice_operator.constants import (
    FIELD_MANAGER,
    GROUP,
    KIND,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LIST_CHUNK_SIZE,
    OPERATOR_NAME,
    PLURAL,
    VERSION,
)

LLMServiceResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)

RESOURCES: dict[tuple[str, str], type[NamespacedResource]] = {
    ("v1", "ConfigMap"): ConfigMap,
    ("v1", "Service"): Service,
    ("apps/v1", "Deployment"): Deployment,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): HorizontalPodAutoscaler,
    ("policy/v1", "PodDisruptionBudget"): PodDisruptionBudget,
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
}
RETRIED_CODES = frozenset({409, 429, 500, 502, 503, 504})
RETRY_DELAYS = (0.1, 0.3, 1.0)  # seconds before each retry; a Retry-After up to MAX_RETRY_AFTER wins
MAX_RETRY_AFTER = 2.0
T = TypeVar("T")


def _retry_after(error: ApiError) -> float:
    header = error.response.headers.get("Retry-After") if error.response is not None else None
    try:
        return min(float(header), MAX_RETRY_AFTER) if header else 0.0
    except ValueError:
        return 0.0


class ChildWriter:
    def __init__(
        self, client: AsyncClient, retries: Counter | None = None, delays: tuple[float, ...] = RETRY_DELAYS
    ) -> None:
        self._client = client
        self._retries = retries  # labelled by HTTP status code
        self._delays = delays

    @classmethod
    def from_environment(cls, retries: Counter | None = None) -> "ChildWriter":
        """In-cluster service account, else $KUBECONFIG or ~/.kube/config (as kopf's own login does)."""
        return cls(AsyncClient(config=KubeConfig.from_env(), field_manager=FIELD_MANAGER), retries)

    async def _retrying(self, request: Callable[[], Awaitable[T]]) -> T:
        for delay in self._delays:
            try:
                return await request()
            except ApiError as error:
                if error.status.code not in RETRIED_CODES:
                    raise
                self._count_retry(str(error.status.code))
                await asyncio.sleep(max(delay, _retry_after(error)))
            except httpx.TransportError as error:
                # A timeout or a dropped connection (an API server under load): as safe to repeat as a 503.
                self._count_retry(type(error).__name__)
                await asyncio.sleep(delay)
        return await request()

    def _count_retry(self, cause: str) -> None:
        if self._retries is not None:
            self._retries.labels(cause).inc()

    async def apply(self, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply with a fixed field manager: creates, updates, and drops fields no longer sent.
        Returns the object as the API server now holds it (its new generation, its old status)."""
        resource = RESOURCES[(manifest["apiVersion"], manifest["kind"])]
        meta = manifest["metadata"]
        applied = await self._retrying(
            lambda: self._client.patch(
                resource,
                meta["name"],
                manifest,
                namespace=meta["namespace"],
                patch_type=PatchType.APPLY,
                field_manager=field_manager,
                force=True,
            )
        )
        return applied.to_dict()

    async def delete(self, api_version: str, kind: str, name: str, namespace: str) -> bool:
        """False when it was already gone."""
        try:
            await self._retrying(
                lambda: self._client.delete(RESOURCES[(api_version, kind)], name, namespace=namespace)
            )
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return True

    async def list_names(self, api_version: str, kind: str, namespace: str) -> set[str]:
        """Names of the operator's children of `kind` in `namespace`, as the API server has them now."""
        resource = RESOURCES[(api_version, kind)]

        async def names() -> set[str]:
            # The watches' own selector and page size (handlers.py), so a resync is as cheap as they are.
            listed = self._client.list(
                resource,
                namespace=namespace,
                labels={LABEL_MANAGED_BY: OPERATOR_NAME, LABEL_INSTANCE: operators.exists()},
                chunk_size=LIST_CHUNK_SIZE,
            )
            return {item.metadata.name async for item in listed}

        return await self._retrying(names)

    async def get(self, api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object as the API server has it now, or None."""
        try:
            found = await self._retrying(
                lambda: self._client.get(RESOURCES[(api_version, kind)], name, namespace=namespace)
            )
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        return found.to_dict()

    async def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        """One key of a Secret, decoded; None when the Secret or the key is missing."""
        try:
            secret = await self._retrying(lambda: self._client.get(Secret, name, namespace=namespace))
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        encoded = (secret.data or {}).get(key)
        return base64.b64decode(encoded).decode() if encoded is not None else None

    async def owner_alive(self, namespace: str, name: str, uid: str) -> bool:
        """Whether the LLMService still exists (as the same object) before a child is recreated for it."""
        try:
            owner = await self._retrying(
                lambda: self._client.get(LLMServiceResource, name, namespace=namespace)
            )
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return owner.metadata.uid == uid and owner.metadata.deletionTimestamp is None

    async def record_replicas(self, namespace: str, name: str, replicas: int, resource_version: str) -> bool:
        """spec.replicas of the LLMService, only if it is still the version the pass read (a user's edit in
        between wins); False when it was not."""
        patch = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
        try:
            await self._client.patch(
                LLMServiceResource, name, patch, namespace=namespace, patch_type=PatchType.MERGE
            )
        except ApiError as error:
            if error.status.code in {404, 409}:
                return False
            raise
        return True

    async def patch_status(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        """A merge patch of the status subresource (for passes started by a child's event)."""
        await self._retrying(
            lambda: self._client.patch(
                LLMServiceResource.Status,
                name,
                {"status": changes},
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        )

    async def close(self) -> None:
        await self._client.close()
