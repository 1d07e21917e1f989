"""Swapping the router artifact while serving: validate a candidate, then replace the policies.

A candidate is loaded (`RouterArtifact.load` checks the format version), must route only to
experts the application defines, and must make a smoke decision (featurize a prompt, gate it,
plan and score a cascade step) with finite numbers. Only then does the router replace its
`Policies`; a request already running keeps the `Policies` it started with, so it finishes on
its artifact. On any error the old artifact keeps serving. Swaps are logged and counted
(`frugalserve_router_swaps{result="ok"|"refused"}`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.cascade.features import answer_features
from frugalserve.experts.spec import resolve_model_path
from frugalserve.serve_app.clients import ExpertClient
from frugalserve.serve_app.config import RoutingConfig
from frugalserve.serve_app.failover import Failover
from frugalserve.serve_app.routing.policies import Policies
from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)
SMOKE_PROMPT = "What is 2 + 2?"


def smoke(policies: Policies) -> None:
    """One decision of each policy, offline: raises ArtifactError when it cannot be made."""
    art = policies.art
    try:
        feats = policies.featurize([SMOKE_PROMPT])
        p = art.gate.probabilities(feats)[0]
        art.gate.choose(feats)
        order = list(art.cascade.order)
        policies.plan(order, feats[0], bool(art.unfamiliar([SMOKE_PROMPT], feats)[0]))
        s = art.score(order[0], answer_features(SMOKE_PROMPT, "4", [-0.1]), feats)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a candidate refuses it
        raise ArtifactError(f"the artifact cannot make a routing decision: {exc!r}") from None
    if not (np.isfinite(p).all() and np.isfinite(s).all()):
        raise ArtifactError("the artifact's gate or scorer gives non-finite numbers")


def load_candidate(path: str, cfg: RoutingConfig, clients: Mapping[str, ExpertClient],
                   expert_names: list[str], old: Policies | None, failover: Failover) -> Policies:
    """The policies of the artifact at `path`, validated; raises ArtifactError naming the fault."""
    try:
        art = RouterArtifact.load(resolve_model_path(path))
    except ArtifactError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"router artifact {path!r} cannot be read: {exc}") from None
    missing = sorted(set(art.experts) - set(expert_names))
    if missing:
        raise ArtifactError(f"router artifact {path!r} routes to experts {missing} that this "
                            f"application does not define ({expert_names})")
    cfg = cfg.model_copy(update={"artifact": path})
    policies = Policies(cfg, art, clients, failover)
    if old is not None:
        policies.sessions = old.sessions  # conversations keep their expert across a swap
        policies.log = old.log  # and logged requests their feedback
    smoke(policies)
    return policies


class SwapRequest(BaseModel):
    """`POST /v1/router`: the artifact folder (or builtin:NAME) to serve, as the router sees it."""

    artifact: str = Field(..., min_length=1)


class Swapper:
    """The router's artifact history: what is served, and how many swaps were made / refused."""

    def __init__(self, path: str | None):
        self.path, self.swaps, self.refused = path, 0, 0
        self.last_error: str | None = None
        self.swapped_at: float | None = None
        self._counter: Any = None

    def _count(self, result: str) -> None:
        try:
            if self._counter is None:
                from ray.serve.metrics import Counter

                self._counter = Counter("frugalserve_router_swaps", "router artifact swaps",
                                        tag_keys=("result",))
            self._counter.inc(tags={"result": result})
        except Exception:  # noqa: BLE001 - outside a replica (tests of the class) there is no agent
            pass

    def swap(self, path: str, cfg: RoutingConfig, clients: Mapping[str, ExpertClient],
             expert_names: list[str], old: Policies | None, failover: Failover) -> Policies:
        try:
            new = load_candidate(path, cfg, clients, expert_names, old, failover)
        except ArtifactError as exc:
            self.refused, self.last_error = self.refused + 1, str(exc)
            self._count("refused")
            logger.warning("router artifact %s refused, %s keeps serving: %s", path, self.path, exc)
            raise
        logger.info("router artifact swapped: %s -> %s", self.path, path)
        self.path, self.swaps, self.swapped_at = path, self.swaps + 1, time.time()
        self._count("ok")
        return new

    def status(self, policies: Policies | None) -> dict:
        art = policies.art if policies is not None else None
        return {"artifact": self.path, "swaps": self.swaps, "refused": self.refused,
                "last_error": self.last_error, "swapped_at": self.swapped_at,
                "experts": art.experts if art else [],
                "cascade": list(art.cascade.order) if art else [],
                "calibrated": (art.meta.get("date") if art else None)}
