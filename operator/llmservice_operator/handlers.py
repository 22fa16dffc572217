"""kopf registrations only; each handler delegates to the reconciler.

Handlers go into a registry built from the settings (not kopf's global one), so that tests can start
the operator more than once in one process. There is no timer: kopf holds a finalizer on objects with
timers, and deleting an LLMService must never wait for the operator.
"""

import asyncio
import logging
from typing import Any

import kopf
from lightkube import ApiError
from prometheus_client import REGISTRY, CollectorRegistry

from llmservice_operator.adapter_sync import AdapterSync
from llmservice_operator.constants import (
    GROUP,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LIST_CHUNK_SIZE,
    OPERATOR_NAME,
    PLURAL,
    VERSION,
)
from llmservice_operator.event_posting import EventPosting
from llmservice_operator.k8s import ChildWriter
from llmservice_operator.metrics import OperatorMetrics
from llmservice_operator.reconcile import CHILD_INDEXES, LLMSERVICE_INDEX, POD_INDEX, Reconciler
from llmservice_operator.requeue import Requeue
from llmservice_operator.resync import list_ghosts, resync_forever
from llmservice_operator.settings import OperatorSettings

CHILD_RESOURCES = {
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "Deployment": ("apps", "v1", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
}
POD_RESOURCE = ("", "v1", "pods")
OWNED = {LABEL_MANAGED_BY: OPERATOR_NAME, LABEL_INSTANCE: kopf.PRESENT}
# The same filter, applied by the API server: kopf's `labels=` filters only what it has already received,
# so without it the operator would list, watch and decode every pod and ConfigMap in the cluster.
OWNED_SELECTOR = f"{LABEL_MANAGED_BY}={OPERATOR_NAME},{LABEL_INSTANCE}"
POD_STATUS_FIELDS = ("conditions", "initContainerStatuses", "containerStatuses", "phase", "podIP")
logger = logging.getLogger(__name__)


def _index_by_owner(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_INSTANCE]): dict(body)}


def _index_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): dict(body)}


def _index_pod(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    # Only what status needs: pods are many and their full bodies large.
    status = {key: body.status[key] for key in POD_STATUS_FIELDS if key in body.status}
    summary = {
        "metadata": {"name": body.metadata.name, "deletionTimestamp": body.metadata.get("deletionTimestamp")},
        "status": status,
    }
    return {(namespace, labels[LABEL_INSTANCE]): summary}


def build_registry(
    settings: OperatorSettings, metrics_registry: CollectorRegistry = REGISTRY
) -> tuple[kopf.OperatorRegistry, OperatorMetrics]:
    registry = kopf.OperatorRegistry()
    operator_settings = settings  # the startup handler's `settings` argument is kopf's own
    metrics = OperatorMetrics(metrics_registry)
    reconciler = Reconciler(settings, metrics)
    requeue = Requeue()
    event_posting = EventPosting()
    llmservices = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
        # Progress and the diff base live in annotations: the CRD's structural schema prunes status.kopf.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # kopf would post every handler success as an Event; the reconciler posts its own.
        settings.posting.level = logging.WARNING
        settings.watching.chunk_size = LIST_CHUNK_SIZE
        for resource in [*CHILD_RESOURCES.values(), POD_RESOURCE]:
            settings.watching.label_selectors[resource] = OWNED_SELECTOR
        memo.writer = ChildWriter.from_environment(metrics.api_retries)
        if operator_settings.resync_seconds > 0:
            memo.resync = asyncio.create_task(resync(memo.writer, kwargs), name="resync")
        memo.adapter_sync = adapter_sync(memo.writer, kwargs)
        memo.adapter_task = asyncio.create_task(memo.adapter_sync.run_forever(), name="adapter-sync")

    def adapter_sync(writer: ChildWriter, indexes: dict[str, Any]) -> AdapterSync:
        async def refresh(body: Any) -> None:
            event_posting.bind()
            await reconciler.reconcile(body=body, writer=writer, indexes=indexes, trigger="adapters")

        return AdapterSync(
            operator_settings.adapter_sync_seconds,
            writer,
            services=lambda: [body for bodies in indexes[LLMSERVICE_INDEX].values() for body in bodies],
            pods=lambda owner: list(indexes[POD_INDEX].get(owner, [])),
            reports=reconciler.adapter_reports,
            refresh=refresh,
        )

    async def resync(writer: ChildWriter, indexes: dict[str, Any]) -> None:
        """kopf's indexes are live: those startup sees fill up as the watches run."""
        api_versions = {
            kind: f"{group}/{version}" if group else version
            for kind, (group, version, _) in CHILD_RESOURCES.items()
        }

        async def repair(owner: tuple[str, str], gone: frozenset[tuple[str, str]]) -> None:
            body = next(iter(indexes[LLMSERVICE_INDEX].get(owner, [])), None)
            event_posting.bind()
            if body is not None:
                await reconciler.reconcile(
                    body=body, writer=writer, indexes=indexes, trigger="resync", gone=gone
                )

        await resync_forever(
            operator_settings.resync_seconds,
            lambda: list_ghosts(writer, indexes, CHILD_INDEXES, api_versions),
            repair,
        )

    @kopf.on.cleanup(registry=registry)
    async def close(memo: kopf.Memo, **_: Any) -> None:
        await requeue.close()
        for name in ("resync", "adapter_task"):
            task = memo.get(name)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        writer = memo.get("writer")
        if writer is not None:
            await writer.close()

    kopf.index(*llmservices, id=LLMSERVICE_INDEX, registry=registry)(_index_by_name)
    for kind, resource in CHILD_RESOURCES.items():
        kopf.index(*resource, labels=OWNED, id=CHILD_INDEXES[kind], registry=registry)(_index_by_owner)
    kopf.index(*POD_RESOURCE, labels=OWNED, id=POD_INDEX, registry=registry)(_index_pod)

    @kopf.on.resume(*llmservices, registry=registry)
    @kopf.on.create(*llmservices, registry=registry)
    @kopf.on.update(*llmservices, registry=registry, field="spec")
    async def reconcile(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        event_posting.capture()
        await reconciler.reconcile(body=body, writer=memo.writer, indexes=kwargs, trigger="change")
        memo.adapter_sync.kick()  # the pods hear of a changed adapter set now, not a round later

    async def child_changed(
        namespace: str, name: str, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        """Any event of a child or pod re-runs its owner's pass: restores drift, refreshes status."""
        event_posting.capture()
        reconciler.expectations.observed((body.get("kind", ""), namespace, name))
        owner_name = labels[LABEL_INSTANCE]

        async def owner_pass() -> bool:
            """False when the pass failed; kopf does not retry event handlers, so `requeue` does."""
            owner = next(iter(kwargs[LLMSERVICE_INDEX].get((namespace, owner_name), [])), None)
            if owner is None:  # being garbage-collected with its owner, or not ours
                return True
            try:
                await reconciler.reconcile(body=owner, writer=memo.writer, indexes=kwargs, trigger="child")
            except kopf.TemporaryError as error:
                logger.warning("LLMService %s/%s: %s; retrying later", namespace, owner_name, error)
                return False
            except ApiError as error:
                if error.status.code != 404:  # 404: the owner was deleted while this pass ran
                    raise
            return True

        if not await owner_pass():
            requeue.retry_later((namespace, owner_name), owner_pass)

    for resource in [*CHILD_RESOURCES.values(), POD_RESOURCE]:
        kopf.on.event(*resource, labels=OWNED, id=f"{resource[2]}_changed", registry=registry)(child_changed)

    @kopf.on.delete(*llmservices, registry=registry, optional=True)
    def forget(namespace: str, name: str, uid: str, **_: Any) -> None:
        # Children go with the LLMService through garbage collection (owner references): no finalizer.
        reconciler.forget(namespace, name, uid)
        requeue.forget((namespace, name))

    return registry, metrics
