"""Children kopf still indexes but the API server no longer has, found by listing them now and then.

After a watch expires (410 Gone) kopf lists the resource again and learns of everything that exists,
but not of what was deleted in between: a child deleted during that window stays in kopf's index, the
operator believes it exists, and nothing recreates it. Every `LLMSERVICE_RESYNC_SECONDS` the operator
lists each child kind in the namespaces it indexes (one LIST per kind and namespace, labels selected)
and runs a pass, with those children taken as absent, for every LLMService that has such a ghost.
This is the periodic resync of client-go's informers, scoped to what kopf cannot see.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from llmservice_operator.k8s import ChildWriter

logger = logging.getLogger(__name__)

Owner = tuple[str, str]  # (namespace, LLMService name)
Ghosts = dict[Owner, frozenset[tuple[str, str]]]  # owner -> {(kind, child name)}


def find_ghosts(
    kind: str, indexed: Mapping[Owner, Iterable[Mapping[str, Any]]], live: set[tuple[str, str]]
) -> Ghosts:
    """The indexed children of `kind` whose (namespace, name) is not among the `live` ones."""
    ghosts: collections.defaultdict[Owner, set[tuple[str, str]]] = collections.defaultdict(set)
    for owner, bodies in indexed.items():
        for body in bodies:
            name = body["metadata"]["name"]
            if (owner[0], name) not in live:
                ghosts[owner].add((kind, name))
    return {owner: frozenset(names) for owner, names in ghosts.items()}


async def list_ghosts(
    writer: ChildWriter,
    indexes: Mapping[str, Any],
    child_indexes: Mapping[str, str],
    kinds: Mapping[str, str],
) -> Ghosts:
    """`child_indexes`: kind -> kopf index name; `kinds`: kind -> apiVersion."""
    ghosts: collections.defaultdict[Owner, frozenset[tuple[str, str]]] = collections.defaultdict(frozenset)
    for kind, index_name in child_indexes.items():
        indexed = {owner: list(bodies) for owner, bodies in indexes[index_name].items()}
        live: set[tuple[str, str]] = set()
        for namespace in sorted({owner[0] for owner in indexed}):
            live |= {(namespace, name) for name in await writer.list_names(kinds[kind], kind, namespace)}
        for owner, names in find_ghosts(kind, indexed, live).items():
            ghosts[owner] |= names
    return dict(ghosts)


async def resync_forever(
    period: float,
    find: Callable[[], Awaitable[Ghosts]],
    repair: Callable[[Owner, frozenset], Awaitable[None]],
) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            ghosts = await find()
        except Exception:  # the next round tries again; a resync must never die silently
            logger.exception("listing children for the resync failed")
            continue
        for owner, gone in ghosts.items():
            logger.info("LLMService %s/%s: %d children are gone from the API server", *owner, len(gone))
            try:
                await repair(owner, gone)
            except Exception:
                logger.exception("repairing LLMService %s/%s failed", *owner)
