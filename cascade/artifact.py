"""The router artifact: a folder with `router.json` (settings) and `weights.npz` (arrays).

No pickle: arrays load with `allow_pickle=False` and the MLPs run in numpy. `FORMAT_VERSION`
changes whenever the layout does; loading a version this code does not read fails with a message
that says so. Version 2 adds the familiarity detector (`familiarity.reference` and its threshold)
and the cascade's start plan; a version 1 artifact still loads, without either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from frugalserve.cascade.familiarity import Familiarity
from frugalserve.cascade.features import ANSWER_FEATURES, Projector
from frugalserve.cascade.gate import Gate
from frugalserve.cascade.mlp import MLP
from frugalserve.cascade.policy import OperatingPoint, best_under_budget
from frugalserve.cascade.scorer import Scorer

FORMAT = "frugalserve-router"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ArtifactError(ValueError):
    """A router artifact that cannot be used (missing, other version, inconsistent)."""


@dataclass(frozen=True)
class CascadePlanSettings:
    """Where the cascade of `order` starts (`frugalserve.cascade.policy.plan_cascade`)."""

    order: tuple[str, ...]  # the operating point the skip thresholds were fitted for
    skip_thresholds: tuple[float, ...]  # start above tier i when the gate's P(correct) < this
    cost_guard: bool  # straight to the top when the expected climb costs more
    fallback: str  # where unfamiliar prompts go, without climbing

    def as_dict(self) -> dict:
        return {"order": list(self.order), "skip_thresholds": list(self.skip_thresholds),
                "cost_guard": self.cost_guard, "fallback": self.fallback}

    @classmethod
    def from_dict(cls, d: dict) -> CascadePlanSettings:
        return cls(tuple(d["order"]), tuple(float(t) for t in d["skip_thresholds"]),
                   bool(d["cost_guard"]), str(d["fallback"]))

    def skips_for(self, order: tuple[str, ...]) -> tuple[float, ...]:
        """The skip thresholds when serving `order` (none for another operating point's order)."""
        return self.skip_thresholds if tuple(order) == self.order else ()


@dataclass
class RouterArtifact:
    experts: list[str]
    featurizer: dict  # {"name": "minilm" | "hashed-ngrams", ...}
    projector: Projector
    scorer: Scorer
    gate: Gate
    cascade: OperatingPoint
    frontier: list[OperatingPoint]
    meta: dict = field(default_factory=dict)
    familiarity: Familiarity | None = None  # None: every prompt counts as familiar
    plan: CascadePlanSettings | None = None  # None: every cascade starts at its cheapest tier

    def unfamiliar(self, texts: list[str], prompt_feats: np.ndarray) -> np.ndarray:
        """[n] bool: prompts unlike the calibration data (all False without a detector)."""
        if self.familiarity is None:
            return np.zeros(len(texts), dtype=bool)
        return self.familiarity.unfamiliar(texts, prompt_feats)

    def score(self, expert: str, answer_feats: np.ndarray, prompt_feats: np.ndarray) -> np.ndarray:
        """The scorer's P(correct) of `expert`'s answers: answer features [n, a] with the prompt
        features [n, d] projected onto the components the scorer was fitted on."""
        dims = self.scorer.models[expert].mean.shape[0] - len(ANSWER_FEATURES)
        return self.scorer.score(expert, answer_feats, self.projector(prompt_feats, dims))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"projector.mean": self.projector.mean,
                  "projector.components": self.projector.components,
                  "gate.mean_cost": self.gate.mean_cost}
        arrays.update(self.gate.model.to_arrays("gate"))
        for e, mlp in self.scorer.models.items():
            arrays.update(mlp.to_arrays(f"scorer.{e}"))
        if self.familiarity is not None:
            arrays["familiarity.reference"] = self.familiarity.reference.astype(np.float16)
            arrays["familiarity.ngrams"] = self.familiarity.ngrams
        np.savez(path / "weights.npz", **arrays)  # type: ignore[arg-type]  # numpy stubs: **arrays
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "experts": self.experts,
            "featurizer": self.featurizer,
            "gate": {"cost_weight": self.gate.cost_weight, "floor": self.gate.floor,
                     "default": self.gate.default, "k": self.gate.k},
            "cascade": self.cascade.as_dict(),
            "frontier": [p.as_dict() for p in self.frontier],
            "scorers": sorted(self.scorer.models),
            "familiarity": None if self.familiarity is None else {
                "k": self.familiarity.k, "quantile": self.familiarity.quantile,
                "threshold": self.familiarity.threshold,
                "coverage_threshold": self.familiarity.coverage_threshold,
                "keep": sorted(self.familiarity.keep)},
            "plan": None if self.plan is None else self.plan.as_dict(),
            "meta": self.meta,
        }
        (path / "router.json").write_text(json.dumps(doc, indent=2, default=json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RouterArtifact:
        path = Path(path)
        doc_path = path / "router.json"
        if not doc_path.is_file():
            raise ArtifactError(f"no router artifact at {str(path)!r} (router.json missing)")
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != FORMAT:
            raise ArtifactError(f"{doc_path} is not a frugalserve router artifact")
        if doc.get("version") not in READABLE_VERSIONS:
            raise ArtifactError(
                f"router artifact {str(path)!r} has format version {doc.get('version')}, this "
                f"frugalserve reads versions {list(READABLE_VERSIONS)}: re-run `frugalserve calibrate`"
            )
        with np.load(path / "weights.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        experts = list(doc["experts"])
        g = doc["gate"]
        gate = Gate(experts, MLP.from_arrays(arrays, "gate"), arrays["gate.mean_cost"],
                    cost_weight=g["cost_weight"], floor=g["floor"], default=g["default"], k=g["k"])
        scorer = Scorer({e: MLP.from_arrays(arrays, f"scorer.{e}") for e in doc["scorers"]})
        fam, familiarity = doc.get("familiarity"), None
        if fam is not None:
            lacking = [k for k in ("familiarity.reference", "familiarity.ngrams") if k not in arrays]
            if lacking:
                raise ArtifactError(f"router artifact {str(path)!r} names a familiarity detector "
                                    f"but weights.npz lacks {lacking}")
            familiarity = Familiarity(arrays["familiarity.reference"].astype(np.float32),
                                      float(fam["threshold"]), arrays["familiarity.ngrams"],
                                      float(fam["coverage_threshold"]),
                                      frozenset(fam.get("keep", ())), int(fam["k"]),
                                      float(fam["quantile"]))
        plan = CascadePlanSettings.from_dict(doc["plan"]) if doc.get("plan") else None
        if plan is not None and plan.fallback not in experts:
            raise ArtifactError(f"router artifact {str(path)!r}: fallback {plan.fallback!r} is not "
                                f"one of its experts {experts}")
        return cls(experts, doc["featurizer"],
                   Projector(arrays["projector.mean"], arrays["projector.components"]),
                   scorer, gate, OperatingPoint.from_dict(doc["cascade"]),
                   [OperatingPoint.from_dict(p) for p in doc["frontier"]], doc.get("meta", {}),
                   familiarity=familiarity, plan=plan)

    def operating_point(self, budget: float | None) -> OperatingPoint:
        """The served cascade, or the most accurate frontier point within `budget`."""
        if budget is None:
            return self.cascade
        point = best_under_budget(self.frontier, budget)
        if point is None:
            raise ArtifactError(
                f"budget {budget:g} is below the cheapest calibrated operating point "
                f"({min(p.cost for p in self.frontier):.6g} cost units per request)"
            )
        return point


def json_default(obj):
    """`json.dumps(default=...)` for numpy scalars and arrays."""
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
