"""One level-triggered reconcile pass: parse, build, apply what drifted, derive status.

The same pass serves create, update and resume of an LLMService and every event of one of its
children or pods (which is how hand edits, deletions and pod states are noticed, without a timer and
so without a finalizer). It reads children from kopf's in-memory indexes (no API reads), writes only
children that differ from what it would apply, and only the status fields that changed: a pass with
nothing to do sends no request at all.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import kopf
from lightkube import ApiError

from llmservice_operator.adapter_status import PodAdapters, adapter_events, summarize
from llmservice_operator.builders import build_children
from llmservice_operator.builders.common import label_selector
from llmservice_operator.builders.config import adapter_sources
from llmservice_operator.builders.service import service_url
from llmservice_operator.conditions import Observation, build_status, condition_events, status_changes
from llmservice_operator.drift import needs_apply, with_applied_hash
from llmservice_operator.expectations import Expectations
from llmservice_operator.handover import HANDOVER_FIELD_MANAGER, handover_manifest, replicas_to_hand_over
from llmservice_operator.k8s import ChildWriter
from llmservice_operator.metrics import OperatorMetrics
from llmservice_operator.replicas import replicas_to_record
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import InvalidSpec, LLMService, check_name, parse_spec

# Index names, as registered in handlers.py; each maps (namespace, LLMService name) to bodies.
LLMSERVICE_INDEX = "llmservices_by_name"
CHILD_INDEXES = {
    "ConfigMap": "configmaps_by_owner",
    "Service": "services_by_owner",
    "Deployment": "deployments_by_owner",
    "HorizontalPodAutoscaler": "hpas_by_owner",
    "PodDisruptionBudget": "pdbs_by_owner",
    "NetworkPolicy": "networkpolicies_by_owner",
}
POD_INDEX = "pods_by_owner"
RETRY_DELAY_SECONDS = 10


class ClusterView:
    """Children and pods of one LLMService, as kopf's indexes last saw them (plus creations in flight)."""

    def __init__(
        self,
        indexes: Mapping[str, Any],
        expectations: Expectations,
        namespace: str,
        owner: str,
        gone: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self._indexes = indexes
        self._gone = gone  # (kind, name) still indexed but known to be deleted (see resync.py)
        self._expectations = expectations
        self._namespace = namespace
        self._key = (namespace, owner)

    def child(self, kind: str, name: str) -> dict[str, Any] | None:
        if (kind, name) in self._gone:
            return None
        bodies: Iterable[dict[str, Any]] = self._indexes[CHILD_INDEXES[kind]].get(self._key, [])
        indexed = next((body for body in bodies if body["metadata"]["name"] == name), None)
        return indexed if indexed is not None else self._expectations.pending((kind, self._namespace, name))

    def pods(self) -> list[dict[str, Any]]:
        return list(self._indexes[POD_INDEX].get(self._key, []))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def controlled_by(body: Mapping[str, Any], uid: str | None) -> bool:
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def conflict_message(conflicts: list[str]) -> str:
    return (
        f"{', '.join(conflicts)} already exist and were not created for this LLMService; the operator "
        "does not take them over: delete or rename them, or rename the LLMService"
    )


def _api_message(error: ApiError) -> str:
    return error.status.message or f"HTTP {error.status.code}"


class Reconciler:
    def __init__(self, settings: OperatorSettings, metrics: OperatorMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        # Passes for one LLMService run one at a time (its children's events arrive concurrently).
        self._locks: collections.defaultdict[tuple[str, str], asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self.expectations = Expectations()
        # The status last written per LLMService uid: the operator is its only writer, and kopf's copy
        # of the owner lags behind the operator's own writes.
        self._written_status: dict[str, dict[str, Any]] = {}
        # What each LLMService's ready pods last said of their adapters (written by adapter_sync.py).
        self.adapter_reports: dict[tuple[str, str], list[PodAdapters]] = {}

    async def reconcile(
        self,
        *,
        body: Mapping[str, Any],
        writer: ChildWriter,
        indexes: Mapping[str, Any],
        trigger: str,
        gone: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        """`trigger` is "change" (the LLMService itself), "child" (an event of a child or pod) or "resync"
        (children in `gone` were found deleted behind kopf's back)."""
        meta = body["metadata"]
        started = time.perf_counter()
        result = "error"
        try:
            async with self._locks[(meta["namespace"], meta["name"])]:
                await self._reconcile(body, writer, indexes, trigger, gone)
            result = "ok"
        except kopf.PermanentError:
            result = "invalid"
            raise
        except ApiError as error:
            # A status write (or the owner check) failed after the client's own retries: "not yet",
            # retried soon, rather than an unexpected error kopf would retry only after 60 s.
            # 404: the LLMService was deleted while the pass ran; the handlers expect that one as is.
            if error.status.code == 404:
                raise
            raise kopf.TemporaryError(
                f"writing status failed: {_api_message(error)}", delay=RETRY_DELAY_SECONDS
            ) from None
        except httpx.TransportError as error:
            # Timeouts that outlasted the writer's retries: soon again, not after kopf's 60 s default
            # (and, for a child's event, not dropped: child_changed requeues a TemporaryError).
            raise kopf.TemporaryError(
                f"the API server did not answer: {type(error).__name__}", delay=RETRY_DELAY_SECONDS
            ) from None
        finally:
            self._metrics.reconciles.labels(trigger, result).inc()
            self._metrics.duration.labels(trigger).observe(time.perf_counter() - started)

    async def _reconcile(
        self,
        body: Mapping[str, Any],
        writer: ChildWriter,
        indexes: Mapping[str, Any],
        trigger: str,
        gone: frozenset[tuple[str, str]],
    ) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            # Being deleted: the garbage collector either deletes the children or, for an orphaning
            # delete, takes their owner references off. Restoring anything now would undo the latter.
            return
        name, namespace = meta["name"], meta["namespace"]
        generation = meta.get("generation")
        view = ClusterView(indexes, self.expectations, namespace, name, gone)
        try:
            check_name(name)
            spec = parse_spec(dict(body.get("spec") or {}))
        except InvalidSpec as error:
            self._metrics.errors.labels("InvalidSpec").inc()
            observation = Observation(
                generation, view.child("Deployment", name), view.pods(), spec_error=str(error)
            )
            await self._write_status(body, writer, observation)
            # Children stay as the last valid spec left them: nothing is half-applied.
            if trigger != "change":
                return
            raise kopf.PermanentError(str(error)) from None

        svc = LLMService(
            name=name, namespace=namespace, spec=spec, uid=meta.get("uid"), generation=generation
        )
        conflicts: list[str] = []
        try:
            applied = await self._apply_children(
                body, svc, view, writer, confirm_owner=trigger != "change", conflicts=conflicts
            )
            if applied is None:
                return
        except ApiError as error:
            self._metrics.errors.labels("ApplyFailed").inc()
            observation = Observation(
                generation, view.child("Deployment", name), view.pods(), apply_error=_api_message(error)
            )
            await self._write_status(body, writer, observation)
            raise kopf.TemporaryError(
                f"applying children failed: {_api_message(error)}", delay=RETRY_DELAY_SECONDS
            ) from None
        # The Deployment as this pass's apply left it, when it did: the watched copy is the old
        # generation's, fully rolled out, and would report an edit Ready before its rollout starts.
        deployment = applied.get("Deployment") or view.child("Deployment", name)
        replicas = replicas_to_record(spec, deployment)
        if replicas is not None:  # the HPA scaled: see replicas.py
            await writer.record_replicas(namespace, name, replicas, meta.get("resourceVersion", ""))
        conflict = conflict_message(conflicts) if conflicts else None
        adapters = summarize(
            [adapter.model_dump(exclude_none=True) for adapter in spec.adapters],
            adapter_sources(svc),
            self.adapter_reports.get((namespace, name), []),
        )
        await self._write_status(
            body,
            writer,
            Observation(generation, deployment, view.pods(), conflict=conflict, adapters=adapters),
        )
        if conflict is not None:
            # The conflicting objects lack the operator's labels, so their removal sends no event
            # here: look again later.
            self._metrics.errors.labels("NameConflict").inc()
            raise kopf.TemporaryError(conflict, delay=RETRY_DELAY_SECONDS)

    async def _apply_children(
        self,
        body: Mapping[str, Any],
        svc: LLMService,
        view: ClusterView,
        writer: ChildWriter,
        confirm_owner: bool,
        conflicts: list[str],
    ) -> dict[str, dict[str, Any]] | None:
        """What the API server returned for each kind applied; None when the owner turned out to be gone
        (nothing was written). When another object holds a child's name, nothing is written and the
        names go into `conflicts`: the Deployment would otherwise run with someone else's ConfigMap."""
        children = build_children(svc, self._settings)
        pending = []
        for manifest in children.desired:
            desired = with_applied_hash(manifest)
            live = view.child(desired["kind"], desired["metadata"]["name"])
            if needs_apply(desired, live):
                pending.append((desired, live))
        creating = [desired for desired, live in pending if live is None]
        # A child's deletion may be the garbage collector following its owner's deletion, seen before the
        # owner's own DELETED event: ask the API server before recreating anything.
        if (
            creating
            and confirm_owner
            and not await writer.owner_alive(svc.namespace, svc.name, svc.uid or "")
        ):
            return None
        for desired in creating:
            # The indexes hold only objects with the operator's labels: ask whether the name is free
            # before an apply (force=True) takes over someone else's object.
            kind, child_name = desired["kind"], desired["metadata"]["name"]
            existing = await writer.get(desired["apiVersion"], kind, child_name, svc.namespace)
            if existing is not None and not controlled_by(existing, svc.uid):
                conflicts.append(f"{kind} {child_name}")
        if conflicts:
            return {}
        applied: dict[str, dict[str, Any]] = {}
        for desired, live in pending:
            kind, child_name = desired["kind"], desired["metadata"]["name"]
            handed_over = replicas_to_hand_over(desired, live) if kind == "Deployment" else None
            if handed_over is not None:  # autoscaling turned on: see handover.py
                await writer.apply(handover_manifest(desired, handed_over), HANDOVER_FIELD_MANAGER)
            applied[kind] = await writer.apply(desired)
            if live is None:
                self.expectations.created((kind, svc.namespace, child_name), desired)
            action = "Created" if live is None else "Updated"
            self._metrics.writes.labels(kind, action.lower()).inc()
            kopf.event(body, type="Normal", reason=action, message=f"{action} {kind} {child_name}")
        for ref in children.absent:
            if view.child(ref.kind, ref.name) is None:
                continue
            if await writer.delete(ref.api_version, ref.kind, ref.name, svc.namespace):
                self._metrics.writes.labels(ref.kind, "deleted").inc()
                kopf.event(
                    body,
                    type="Normal",
                    reason="Deleted",
                    message=f"Deleted {ref.kind} {ref.name}: the spec no longer asks for it",
                )
        return applied

    async def _write_status(
        self, body: Mapping[str, Any], writer: ChildWriter, observation: Observation
    ) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        current = self._written_status.get(meta.get("uid", "")) or dict(body.get("status") or {})
        desired = build_status(
            observation,
            current,
            selector=label_selector(name),
            url=service_url(name, namespace, self._settings.cluster_domain),
            now=_now(),
        )
        self._metrics.conditions.record(namespace, name, desired["conditions"])
        changes = status_changes(current, desired)
        if not changes:
            return
        await writer.patch_status(namespace, name, changes)
        self._written_status[meta.get("uid", "")] = desired
        events = condition_events(current.get("conditions") or [], desired["conditions"])
        events += adapter_events(current.get("adapters") or [], desired["adapters"])
        for event_type, reason, message in events:
            kopf.event(body, type=event_type, reason=reason, message=message)

    def forget(self, namespace: str, name: str, uid: str) -> None:
        self._metrics.conditions.forget(namespace, name)
        self._locks.pop((namespace, name), None)
        self._written_status.pop(uid, None)
        self.adapter_reports.pop((namespace, name), None)
