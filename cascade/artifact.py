"""The router artifact: a folder with `router.json` (settings) and `weights.npz` (arrays).

No pickle: arrays load with `allow_pickle=False` and the MLPs run in numpy. `FORMAT_VERSION`
changes whenever the layout does; loading another version fails with a message that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from frugalserve.cascade.features import ANSWER_FEATURES, Projector
from frugalserve.cascade.gate import Gate
from frugalserve.cascade.mlp import MLP
from frugalserve.cascade.policy import OperatingPoint, best_under_budget
from frugalserve.cascade.scorer import Scorer

FORMAT = "frugalserve-router"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A router artifact that cannot be used (missing, other version, inconsistent)."""


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
        if doc.get("version") != FORMAT_VERSION:
            raise ArtifactError(
                f"router artifact {str(path)!r} has format version {doc.get('version')}, this "
                f"frugalserve reads version {FORMAT_VERSION}: re-run `frugalserve calibrate`"
            )
        with np.load(path / "weights.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        experts = list(doc["experts"])
        g = doc["gate"]
        gate = Gate(experts, MLP.from_arrays(arrays, "gate"), arrays["gate.mean_cost"],
                    cost_weight=g["cost_weight"], floor=g["floor"], default=g["default"], k=g["k"])
        scorer = Scorer({e: MLP.from_arrays(arrays, f"scorer.{e}") for e in doc["scorers"]})
        return cls(experts, doc["featurizer"],
                   Projector(arrays["projector.mean"], arrays["projector.components"]),
                   scorer, gate, OperatingPoint.from_dict(doc["cascade"]),
                   [OperatingPoint.from_dict(p) for p in doc["frontier"]], doc.get("meta", {}))

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
