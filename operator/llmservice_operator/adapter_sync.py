"""Gives every ready model pod its LLMService's adapters, through the pod's own API, and records what the
pods answer for the LLMService's status (status.adapters, AdaptersReady).

Level-triggered: each round PUTs the whole current set to every ready pod (the server treats the same
set again as a no-op), so a pod that missed a change, restarted or was unreachable converges on the next
round. Rounds run every LLMSERVICE_ADAPTER_SYNC_SECONDS, every second while an adapter is loading, and at
once after a spec change (`kick`). So a running pod serves an added adapter within one round (10 s by
default) plus the adapter's download and load time. Pods started later read the same set from the
ConfigMap (LLM_ADAPTERS) before they report ready. With spec.apiKeySecretRef the calls carry the key,
read from the Secret each round (never logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from lightkube import ApiError

from llmservice_operator.adapter_status import PodAdapters, Report
from llmservice_operator.builders.config import adapter_sources
from llmservice_operator.constants import SERVER_PORT
from llmservice_operator.k8s import ChildWriter
from llmservice_operator.spec import InvalidSpec, LLMService, parse_spec

logger = logging.getLogger(__name__)
UNSETTLED_SECONDS = 1.0
REQUEST_SECONDS = 5.0
MAX_CONCURRENT_CALLS = 32
Owner = tuple[str, str]


def ready_pod_addresses(pods: list[dict[str, Any]]) -> dict[str, str]:
    """Pod name -> IP of the pods that are Ready and not being deleted."""
    addresses = {}
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(
            item.get("type") == "Ready" and item.get("status") == "True"
            for item in status.get("conditions") or []
        )
        if ready and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
            addresses[pod["metadata"]["name"]] = status["podIP"]
    return addresses


def adapters_url(ip: str) -> str:
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"http://{host}:{SERVER_PORT}/v1/adapters"


def unsettled(reports: list[PodAdapters]) -> bool:
    return any(
        not isinstance(pod.report, str)
        and any(item.get("state") in ("Pending", "Loading") for item in pod.report)
        for pod in reports
    )


class AdapterSync:
    def __init__(
        self,
        period: float,
        writer: ChildWriter,
        services: Callable[[], list[Mapping[str, Any]]],
        pods: Callable[[Owner], list[dict[str, Any]]],
        reports: dict[Owner, list[PodAdapters]],
        refresh: Callable[[Mapping[str, Any]], Awaitable[None]],
    ) -> None:
        """`services`: the LLMServices as indexed; `pods`: an LLMService's pods as indexed; `reports`: where
        the results go (the reconciler's); `refresh`: a reconcile pass that writes status from them."""
        self._period = period
        self._writer = writer
        self._services = services
        self._pods = pods
        self._reports = reports
        self._refresh = refresh
        self._kicked = asyncio.Event()
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self._session: aiohttp.ClientSession | None = None

    def kick(self) -> None:
        self._kicked.set()

    async def run_forever(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS))
        try:
            while True:
                self._kicked.clear()
                try:
                    busy = await self.sync_all()
                except Exception:  # the next round tries again; the loop must never die silently
                    logger.exception("syncing adapters failed")
                    busy = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kicked.wait(), UNSETTLED_SECONDS if busy else self._period)
        finally:
            await self._session.close()

    async def sync_all(self) -> bool:
        """One round over every LLMService; True while some adapter is still loading somewhere."""
        services = self._services()
        results = await asyncio.gather(*(self._sync(body) for body in services), return_exceptions=True)
        # Reports of LLMServices gone (or no longer generating) go with them.
        kept = {(body["metadata"]["namespace"], body["metadata"]["name"]) for body in services}
        for owner in [owner for owner in self._reports if owner not in kept]:
            del self._reports[owner]
        for result in results:
            if isinstance(result, BaseException):
                logger.error("syncing adapters of an LLMService failed", exc_info=result)
        return any(result is True for result in results)

    async def _sync(self, body: Mapping[str, Any]) -> bool:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return False
        try:
            spec = parse_spec(dict(body.get("spec") or {}))
        except InvalidSpec:
            return False  # the reconciler reports it
        if spec.task != "generate":
            return False
        owner = (meta["namespace"], meta["name"])
        svc = LLMService(name=meta["name"], namespace=meta["namespace"], spec=spec, uid=meta.get("uid"))
        entries = [{"name": name, **source} for name, source in adapter_sources(svc).items()]
        addresses = ready_pod_addresses(self._pods(owner))
        # A pod that answered an empty set, while the set stays empty, has nothing to converge to (it
        # restarts with the ConfigMap's, empty too): most LLMServices have no adapters.
        settled = {pod.pod for pod in self._reports.get(owner, []) if pod.report == [] and not entries}
        calling = {pod: ip for pod, ip in addresses.items() if pod not in settled}
        answers: dict[str, Report] = {pod: [] for pod in addresses if pod in settled}
        if calling:  # the API key is read only when there is a pod to call
            headers, problem = await self._auth(svc)
            replies = (
                [problem] * len(calling)
                if problem is not None
                else await asyncio.gather(*(self._put(ip, entries, headers) for ip in calling.values()))
            )
            answers.update(zip(calling, replies, strict=True))
        reports = [PodAdapters(pod, answers[pod]) for pod in addresses]
        if reports != self._reports.get(owner):
            previous = self._reports.get(owner)
            self._reports[owner] = reports  # the pass reads it from here
            try:
                await self._refresh(body)
            except BaseException:
                # Not in status yet: the next round must see a change and try the pass again.
                if previous is None:
                    self._reports.pop(owner, None)
                else:
                    self._reports[owner] = previous
                raise
        return unsettled(reports)

    async def _auth(self, svc: LLMService) -> tuple[dict[str, str], str | None]:
        ref = svc.spec.api_key_secret_ref
        if ref is None:
            return {}, None
        try:
            key = await self._writer.secret_value(svc.namespace, ref.name, ref.key)
        except (ApiError, UnicodeDecodeError) as error:
            detail = error.status.message if isinstance(error, ApiError) else "not UTF-8"
            return {}, f"the API key Secret {ref.name} could not be read: {detail}"
        if key is None:
            return {}, f"the API key Secret {ref.name} (key {ref.key}) could not be read"
        return {"Authorization": f"Bearer {key}"}, None

    async def _put(self, ip: str, entries: list[dict[str, Any]], headers: dict[str, str]) -> Report:
        assert self._session is not None
        async with self._limit:
            try:
                async with self._session.put(
                    adapters_url(ip), json={"adapters": entries}, headers=headers
                ) as reply:
                    if reply.status != 200:
                        detail = ""
                        if reply.status == 400:  # the set itself was refused: say why
                            body = await reply.json(content_type=None)
                            detail = f": {body['error']['message']}"
                        return f"the pod's adapter API answered HTTP {reply.status}{detail}"
                    return list((await reply.json())["adapters"])
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
                return f"the pod's adapter API could not be reached: {type(error).__name__}"
