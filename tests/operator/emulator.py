"""kmock's Kubernetes emulator, with the API-server behaviour the operator relies on filled in.

kmock 0.8 stores objects as plain JSON and merges patches. A real API server also stamps uid,
resourceVersion, generation and creationTimestamp, creates objects on a server-side apply, applies
/status patches to status alone, and its garbage collector deletes dependents of a deleted owner.
This subclass adds exactly those (the collector also removes objects created for an owner that is
already gone), so the operator runs against them as it would against a cluster.

kmock also keeps every request for assertions and matches each new one against all of them, which is
quadratic; this emulator forgets a request once answered (tests count calls in `calls` instead).

`faults` (a FaultPlan, empty by default) makes it fail chosen requests and end watch streams.
"""

import collections
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import aiohttp.web
import kmock
from kmock._internal import rendering
from kmock._internal.k8s import KubernetesError

from tests.operator.faults import EXPIRED, REASONS, FaultPlan, agent_of, client_of

APPLY_PATCH = "application/apply-patch+yaml"


class Call(NamedTuple):
    user_agent: str
    method: str
    action: str  # kmock's reading of the request: LIST, WATCH, FETCH, CREATE, UPDATE, DELETE
    group: str
    plural: str
    subresource: str


LLMSERVICES = "serving.llmservice.io/v1alpha1/llmservices"


class ClusterEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.resources[LLMSERVICES] = kmock.ResourceInfo(
            kind="LLMService",
            singular="llmservice",
            namespaced=True,
            shortnames={"llms"},
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
            subresources={"status", "scale"},
        )
        self.versions = itertools.count(1)
        self.deleted_uids: set[str] = set()
        self.log: list[Call] = []  # every API call and who made it (for the RBAC check)
        # (method, resource plural, subresource) -> count; for request budgets in tests and benchmarks.
        self.calls: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.faults = FaultPlan()

    def writes(self) -> int:
        return sum(
            count
            for (method, _, _), count in self.calls.items()
            if method in {"POST", "PUT", "PATCH", "DELETE"}
        )

    def _existing(self, request: rendering.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        if key in self._objects and not self._objects[key].deleted:
            return self._objects[key]
        return None

    def _stamp(self, request: rendering.Request) -> None:
        data = request.data
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if request.action == kmock.action.UPDATE and request.name is not None:
            existing = self._existing(request)
            if existing is not None:
                if request.subresource == "status":
                    for key in list(data):
                        if key != "status":
                            del data[key]
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(self.versions))
                old = existing.raw
                spec_changes = (
                    "spec" in data
                    and request.subresource is None
                    and _merged(old.get("spec"), data["spec"]) != old.get("spec")
                )
                if spec_changes:
                    meta["generation"] = old.get("metadata", {}).get("generation", 1) + 1
                return
        if request.action == kmock.action.CREATE or self._is_creating_apply(request):
            meta = data.setdefault("metadata", {})
            meta.setdefault("namespace", request.namespace)
            if "name" not in meta and "generateName" in meta:
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:10]
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(next(self.versions)),
                generation=1,
                creationTimestamp=now,
            )

    def _is_creating_apply(self, request: rendering.Request) -> bool:
        return (
            request.action == kmock.action.UPDATE
            and request.name is not None
            and request.headers.get("Content-Type", "").startswith(APPLY_PATCH)
            and self._existing(request) is None
        )

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None:
            method = str(request.method.value).upper()
            self.calls[(method, request.resource.plural or "", request.subresource or "")] += 1
            action = request.action.value if request.action else ""
            call = Call(
                request.headers.get("User-Agent", ""),
                method,
                action,
                request.resource.group or "",
                request.resource.plural or "",
                request.subresource or "",
            )
            self.log.append(call)
            if isinstance(request.data, dict) and self._is_creating_apply(request):
                # The API server authorizes a server-side apply that creates the object as `create`
                # too (Kubernetes' API concepts: server-side apply), beside the request's `patch`.
                self.log.append(call._replace(action="CREATE"))
            faulted = await self._fault(request, method)
            if faulted is not None:
                self._requests.remove(request)
                return faulted
            if isinstance(request.data, dict):
                creating = self._is_creating_apply(request)
                self._stamp(request)
                if creating:  # server-side apply creates what does not exist
                    async with self._lock:
                        self._objects[request.resource, request.namespace, request.name] = request.data
                        await self._buses[request.resource].put({"type": "ADDED", "object": request.data})
        deleting = (
            self._existing(request) if (request.action == kmock.action.DELETE and request.name) else None
        )
        deleted_uid = deleting.raw.get("metadata", {}).get("uid") if deleting is not None else None
        try:
            response = await super()._handle(request)
        finally:
            self._requests.remove(request)
        if response.status < 300:
            if deleted_uid is not None:
                self.deleted_uids.add(deleted_uid)
                await self._collect_garbage({deleted_uid})
            elif request.action in {kmock.action.CREATE, kmock.action.UPDATE} and isinstance(
                request.data, dict
            ):
                owners = {
                    ref.get("uid") for ref in request.data.get("metadata", {}).get("ownerReferences") or []
                }
                if owners & self.deleted_uids:
                    await self._collect_garbage(owners & self.deleted_uids)
        return response

    async def _fault(self, request: rendering.Request, method: str) -> aiohttp.web.StreamResponse | None:
        """The error to answer instead of serving the request, if the fault plan says so."""
        client = client_of(request)
        if self.faults.is_dead(client):
            # A killed operator: its process is gone, so nothing it still sends may change anything.
            return await self._render_error(KubernetesError(503, "ServiceUnavailable", "client is dead"))
        assert request.resource is not None
        fault = self.faults.request_fault(client, agent_of(request), method, request.resource.plural or "")
        if fault is None:
            return None
        reason, message = REASONS[fault.status]
        response = await self._render_error(KubernetesError(fault.status, reason, message, {}))
        if fault.status == 429:
            response.headers["Retry-After"] = str(fault.retry_after)
        return response

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        """kmock's watch, which the fault plan may end at a live event (after the replay of what exists)."""
        client = client_of(request)
        plural = request.resource.plural if request.resource is not None else ""
        async with self._lock:
            replayed = sum(
                1
                for (resource, _, _), obj in self._objects.items()
                if resource == request.resource and not obj.deleted
            )
        sent = 0
        async for event in super()._serve_watch(request):
            if self.faults.is_dead(client):
                return
            if event and sent > replayed:
                fault = self.faults.watch_fault(client, agent_of(request), plural)
                if fault is not None:
                    # 410: the event is lost, the client must list again (which shows the state, not
                    # what happened: a deletion in between is never seen as an event). A dropped
                    # stream loses nothing on a real server (the client resumes from its last
                    # resourceVersion); kmock keeps no history, so the event goes out before the drop.
                    if fault.expire:
                        yield {"type": "ERROR", "object": EXPIRED}
                    else:
                        yield event
                    return
            sent += 1
            yield event

    async def _render_error(self, exc: Exception) -> Any:
        # A real API server answers errors as plain application/json (clients match it exactly).
        response = await super()._render_error(exc)
        response.headers["Content-Type"] = "application/json"
        return response

    async def _collect_garbage(self, owner_uids: set[str]) -> None:
        """Background cascading deletion, as the controller manager's garbage collector does."""
        async with self._lock:
            for (resource, _, _), obj in list(self._objects.items()):
                if obj.deleted:
                    continue
                owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
                if any(owner.get("uid") in owner_uids for owner in owners):
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})


def _merged(old: Any, patch: Any) -> Any:
    if not isinstance(old, dict) or not isinstance(patch, dict):
        return patch
    result = dict(old)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merged(old.get(key), value)
    return result
