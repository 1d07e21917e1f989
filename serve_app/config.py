"""`AppConfig`: the application's typed config, the `args` of the `serve run` YAML.

The same dict feeds `serve run configs/local.yaml`, the KubeRay RayService's `serveConfigV2` and
the CLI; it is validated here once, at load, with errors that name the bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.experts.spec import ExpertSpec, resolve_model_path
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

APP_IMPORT_PATH = "frugalserve.serve_app.app:build_app"
RESERVED_MODEL_IDS = frozenset({"moe", "cascade"})


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="router (ingress) replicas")
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs per router replica")
    max_ongoing_requests: int = Field(
        256, ge=1, description="requests one router replica holds at once"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="longest a request may take end to end before a 504"
    )
    max_queued_requests: int = Field(
        1024, ge=-1, description="requests waiting for a router replica before the proxy "
        "answers 503; -1: no bound"
    )
    api_keys_env: str | None = Field(
        None, description="environment variable with comma-separated API keys; set: every "
        "/v1 request needs `Authorization: Bearer <key>`"
    )
    api_keys_file: str | None = Field(
        None, description="file with one API key per line (e.g. a mounted Kubernetes secret)"
    )


class RoutingConfig(BaseModel):
    """The `moe` and `cascade` policies, from a calibrated router artifact."""

    model_config = ConfigDict(extra="forbid")

    artifact: str | None = Field(
        None, description="router artifact folder (or builtin:NAME) from `frugalserve calibrate`;"
        " unset: no routing policies, experts only"
    )
    gate_k: int = Field(1, ge=1, le=8, description="experts the MoE gate asks per request")
    gate_floor: float | None = Field(
        None, ge=0, le=1, description="override the artifact's confidence floor"
    )
    gate_default: str | None = Field(
        None, description="override the expert used under the floor (default: artifact's)"
    )
    sticky: bool = Field(True, description="keep a conversation on its expert or higher tier")
    session_ttl_s: float = Field(3600.0, gt=0, description="how long a session is remembered")
    max_sessions: int = Field(10000, ge=1, description="sessions remembered per router replica")


class AppConfig(BaseModel):
    """What `build_app` takes: the experts, the router, and how to place replicas."""

    model_config = ConfigDict(extra="forbid")

    experts: list[ExpertSpec] = Field(..., min_length=1, description="one deployment each")
    default_model: str | None = Field(
        None, description="the expert or policy that answers `model: default`; first expert if unset"
    )
    router: RouterConfig = Field(default_factory=RouterConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    gpus: Literal["auto", "always", "never"] = Field(
        "auto",
        description="reserve `resources.num_gpus` per expert replica: auto = only where the "
        "Ray cluster has GPUs",
    )
    _artifact: RouterArtifact | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        names = [e.name for e in self.experts] + [a for e in self.experts for a in e.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {dupes}")
        reserved = sorted(set(names) & (RESERVED_MODEL_IDS | {"default"}))
        if reserved:
            raise ValueError(f"expert names {reserved} are reserved for routing policies")
        models = names + (sorted(RESERVED_MODEL_IDS) if self.routing.artifact else [])
        if self.default_model is not None and self.default_model not in models:
            raise ValueError(f"default_model {self.default_model!r} is not an expert or a "
                             f"configured policy: {models}")
        if self.routing.gate_default is not None and self.routing.gate_default not in names:
            raise ValueError(f"routing.gate_default {self.routing.gate_default!r} is not an "
                             f"expert: {names}")
        if self.routing.artifact is not None:
            self._check_artifact(names)
        return self

    def _check_artifact(self, names: list[str]) -> None:
        assert self.routing.artifact is not None
        try:
            art = RouterArtifact.load(resolve_model_path(self.routing.artifact))
        except ArtifactError as exc:
            raise ValueError(f"routing.artifact: {exc}") from None
        missing = sorted(set(art.experts) - set(names))
        if missing:
            raise ValueError(f"routing.artifact {self.routing.artifact!r} routes to experts "
                             f"{missing} that this config does not define")
        self._artifact = art

    @property
    def artifact(self) -> RouterArtifact | None:
        """The router artifact of `routing.artifact`, loaded once, when this config was validated."""
        return self._artifact

    def model_ids(self) -> list[str]:
        """Every expert a client can name: experts and the LoRA adapters they serve."""
        return [e.name for e in self.experts] + [a for e in self.experts for a in e.adapters]

    def adapter_bases(self) -> dict[str, str]:
        """adapter name -> the expert (deployment) that serves it."""
        return {a: e.name for e in self.experts for a in e.adapters}

    def expert(self, name: str) -> ExpertSpec:
        for spec in self.experts:
            if spec.name == name:
                return spec
        raise KeyError(name)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def format_validation_error(exc: ValidationError, where: str) -> str:
    lines = [f"invalid config {where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
        lines.append(f"  {loc}: {err['msg']}{shown}")
    return "\n".join(lines)


def parse_app_config(args: dict[str, Any], where: str = "args") -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a `serve run` YAML (Serve's multi-application format) and validate our app's args."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("applications"), list):
        raise ConfigError(f"{path}: expected Serve's config format with an `applications` list")
    for i, app in enumerate(data["applications"]):
        if app.get("import_path") == APP_IMPORT_PATH:
            parse_app_config(app.get("args") or {}, where=f"{path}: applications[{i}].args")
    return data


def app_config_from_file(path: str | Path, app_name: str | None = None) -> AppConfig:
    data = load_serve_config(path)
    for i, app in enumerate(data["applications"]):
        if app.get("import_path") == APP_IMPORT_PATH and app_name in (None, app.get("name")):
            return parse_app_config(app.get("args") or {}, where=f"{path}: applications[{i}].args")
    raise ConfigError(f"{path}: no application with import_path {APP_IMPORT_PATH!r}")
