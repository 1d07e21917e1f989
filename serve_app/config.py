"""`AppConfig`: the application's typed config, the `args` of the `serve run` YAML.

The same dict feeds `serve run configs/local.yaml`, the KubeRay RayService's `serveConfigV2` and
the CLI; it is validated here once, at load, with errors that name the bad field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.experts.spec import NAME_PATTERN, EngineSpec, resolve_model_path
from frugalserve.serve_app import naming
from frugalserve.serve_app.specs import DeploymentSpec, RemoteSpec
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
        300.0, gt=0, description="the request's deadline: longest it may take end to end, "
        "retries included, before a 504 `deadline_exceeded`"
    )
    max_retries: int = Field(
        2, ge=0, le=10, description="further attempts of a request whose expert failed before "
        "sending anything (another replica, then its fallbacks or the policy's next choice), "
        "within the deadline; 0: none"
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
    familiarity: bool = Field(
        True, description="send prompts unlike the calibration data to `fallback` without "
        "climbing (artifacts of format 2 and later)"
    )
    fallback: str | None = Field(
        None, description="override where unfamiliar prompts go (default: the artifact's, the "
        "strongest tier)"
    )
    log_path: str | None = Field(
        None, description="routing log (JSONL) each router replica appends to: one line per "
        "routed request and per feedback; unset: no log, and /v1/feedback is refused"
    )
    log_text: bool = Field(
        False, description="also log the prompt text and the answers (needed by "
        "`calibrate --from-logs`); off: a hash of the prompt only"
    )
    sticky: bool = Field(True, description="keep a conversation on its expert or higher tier")
    session_ttl_s: float = Field(3600.0, gt=0, description="how long a session is remembered")
    max_sessions: int = Field(10000, ge=1, description="sessions remembered per router replica")


# Where each field of the old one-level expert config went (the config's shape before the split).
_ENGINE_FIELDS = ("dtype", "device", "quantization", "double_quant", "adapters", "vllm",
                  "max_context", "max_tokens_default", "kv_cache")
_DEPLOYMENT_FIELDS = ("resources", "num_replicas", "max_ongoing_requests", "max_queued_requests")
MOVED = {
    "model": "`model` moved to `engine.model`",
    "engine": "`engine: transformers|vllm` moved to `engine.backend`",
    "batching": "`batching` moved: `continuous`, `max_batch_size`, `max_batched_tokens`, "
                "`admission_delay_s`, `stream_interval_s` to `engine.scheduler`; "
                "`batch_wait_timeout_s` to `deployment.batch_wait_timeout_s`",
    "autoscaling": "`autoscaling` moved to `deployment.autoscaling`, except `memory_fraction` and "
                   "`memory_budget_bytes`, which moved to `engine.kv_cache`",
    "kind": "`kind` is gone: an expert with a `remote` section is remote, one with an `engine` "
            "section is local",
    "base_url": "`base_url` moved to `remote.base_url`",
    "api_key_env": "`api_key_env` moved to `remote.api_key_env`",
    "remote_model": "`remote_model` moved to `remote.model`",
    "connect_timeout_s": "`connect_timeout_s` moved to `remote.connect_timeout_s`",
    **{f: f"`{f}` moved to `engine.{f}`" for f in _ENGINE_FIELDS},
    **{f: f"`{f}` moved to `deployment.{f}`" for f in _DEPLOYMENT_FIELDS},
}


def old_shape_error(fields: dict[str, Any]) -> str | None:
    """What moved where, for an expert written in the config's old one-level shape."""
    old = [k for k in MOVED if k in fields and not (k == "engine" and not isinstance(fields[k], str))]
    if not old:
        return None
    return ("this expert is in the old config shape (engine, deployment and remote fields side "
            "by side); " + "; ".join(MOVED[k] for k in old) + " (docs/configuration.md)")


class ExpertConfig(BaseModel):
    """One expert (or cascade tier): a local model (`engine` + `deployment`) or a remote endpoint
    (`remote`), and what it costs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN, description="id clients use as `model`")
    description: str = ""
    engine: EngineSpec | None = Field(None, description="a local expert: the engine of each replica")
    deployment: DeploymentSpec = Field(
        default_factory=DeploymentSpec, description="a local expert: its Serve deployment")
    remote: RemoteSpec | None = Field(None, description="a remote expert: the endpoint")
    cost_per_1k_prompt: float | None = Field(
        None, ge=0, description="cost units per 1k prompt tokens; default: from parameter count"
    )
    cost_per_1k_completion: float | None = Field(
        None, ge=0, description="cost units per 1k completion tokens; default: from parameter count"
    )
    fallbacks: list[str] = Field(
        default_factory=list, description="experts that answer, in this order, when this one "
        "fails before sending anything (after a retry on another replica)")

    @model_validator(mode="before")
    @classmethod
    def _old_shape(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = old_shape_error(data)
            if moved:
                raise ValueError(f"expert {data.get('name', '?')!r}: {moved}")
        return data

    @model_validator(mode="after")
    def _kind(self) -> ExpertConfig:
        if (self.engine is None) == (self.remote is None):
            raise ValueError(f"expert {self.name!r} needs exactly one of `engine` (a local model) "
                             "and `remote` (an OpenAI-compatible endpoint)")
        if self.remote is not None:
            if self.deployment != DeploymentSpec():
                raise ValueError(f"expert {self.name!r} is remote: it has no `deployment`")
            if self.cost_per_1k_prompt is None or self.cost_per_1k_completion is None:
                raise ValueError(f"expert {self.name!r} is remote: it needs cost_per_1k_prompt "
                                 "and cost_per_1k_completion (its size is unknown)")
        return self

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    @property
    def local(self) -> EngineSpec:
        """The engine spec of a local expert (raises for a remote one)."""
        if self.engine is None:
            raise ValueError(f"expert {self.name!r} is remote: it has no engine")
        return self.engine

    @property
    def adapters(self) -> dict[str, str]:
        return self.engine.adapters if self.engine is not None else {}


class AppConfig(BaseModel):
    """What `build_app` takes: the experts, the router, and how to place replicas."""

    model_config = ConfigDict(extra="forbid")

    experts: list[ExpertConfig] = Field(..., min_length=1, description="one deployment each")
    default_model: str | None = Field(
        None, description="the expert or policy that answers `model: default`; first expert if unset"
    )
    router: RouterConfig = Field(default_factory=RouterConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    aliases: dict[str, str] = Field(
        default_factory=dict, description="model names clients may send for an expert, a policy "
        "or a policy with options (`cascade:budget=0.02`), e.g. {gpt-4o-mini: cascade}")
    gpus: Literal["auto", "always", "never"] = Field(
        "auto",
        description="reserve `deployment.resources.num_gpus` per expert replica: auto = only where the "
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
        if self.routing.fallback is not None and self.routing.fallback not in names:
            raise ValueError(f"routing.fallback {self.routing.fallback!r} is not an expert: {names}")
        if self.routing.artifact is not None:
            self._check_artifact(names)
        self._check_aliases(names, models)
        for e in self.experts:
            wrong = [f for f in e.fallbacks if f not in names or f == e.name]
            if wrong:
                raise ValueError(f"experts.{e.name}.fallbacks: {wrong} are not other experts of "
                                 f"this config: {names}")
        return self

    def _check_aliases(self, names: list[str], models: list[str]) -> None:
        for alias, target in self.aliases.items():
            if alias in models or alias == "default" or not re.fullmatch(NAME_PATTERN, alias):
                raise ValueError(f"alias {alias!r} must be a new name (letters, digits, '.', '_', "
                                 "'-'), not an expert or a policy")
            try:
                base, options = naming.parse(target)
            except naming.ModelNameError as exc:
                raise ValueError(f"aliases.{alias}: {exc}") from None
            if base not in models or (options and base in names):
                raise ValueError(f"aliases.{alias}: {target!r} is not an expert or a configured "
                                 f"policy (with options): {models}")

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

    def expert(self, name: str) -> ExpertConfig:
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
