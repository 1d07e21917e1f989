"""The Serve halves of an expert's config: `DeploymentSpec` (how Serve runs a local expert's
replicas: resources, replicas, autoscaling, queue limits, its batcher, health checks — Ray Serve
LLM's `deployment_config`) and `RemoteSpec` (an OpenAI-compatible endpoint the router calls).
The engine's half is `frugalserve.experts.spec.EngineSpec`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ReplicaResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="logical CPUs per replica")
    num_gpus: float = Field(
        1.0, ge=0, description="GPUs per replica; used only where the cluster has GPUs"
    )
    memory_bytes: int | None = Field(None, ge=0, description="Ray memory reservation per replica")


class AutoscalingSpec(BaseModel):
    """How Serve scales an expert: by memory per token in flight (frugalserve.cluster.autoscaling)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="scale by memory per token; off: `num_replicas` fixed")
    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    max_replicas: int = Field(4, ge=1, description="most replicas")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy; default min")
    target_utilisation: float = Field(
        0.7, gt=0, le=1, description="share of a replica's usable memory its tokens should take"
    )
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="request floor: replicas >= ongoing / this; default 2 x "
        "engine.scheduler.max_batch_size"
    )
    upscale_delay_s: float = Field(0.0, ge=0, description="demand above this long before adding")
    downscale_delay_s: float = Field(60.0, ge=0, description="demand below this long before removing")
    look_back_period_s: float = Field(10.0, gt=0, description="window the replicas' reports average over")
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas report")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must be <= "
                             f"max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"autoscaling.initial_replicas ({self.initial_replicas}) must be "
                             f"within [{self.min_replicas}, {self.max_replicas}]")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"autoscaling.look_back_period_s ({self.look_back_period_s}) must be "
                             f"> metrics_interval_s ({self.metrics_interval_s})")
        return self


class DeploymentSpec(BaseModel):
    """The Serve deployment of one local expert (named `expert-<name>`)."""

    model_config = ConfigDict(extra="forbid")

    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    num_replicas: int = Field(1, ge=1, description="replicas when autoscaling is off")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests a replica holds at once (Serve's backpressure)"
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for a replica before new ones get a 503 "
        "`overloaded`; -1: no bound"
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="static engines: how long the first request of a Serve "
        "batch waits for company"
    )
    health_check_period_s: float = Field(10.0, gt=0, description="how often Serve checks a replica")
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="a health check that takes longer marks the replica unhealthy"
    )
    timeout_s: float | None = Field(
        None, gt=0, description="longest one call to a replica may take (a stream: until its "
        "first token, and each gap between tokens) before it is abandoned and retried; default: "
        "the request's deadline"
    )


class RemoteSpec(BaseModel):
    """An OpenAI-compatible endpoint as an expert, called by the router (no deployment)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_url: str = Field(..., min_length=1, description="the endpoint's /v1 URL")
    api_key_env: str | None = Field(
        None, description="environment variable that holds the API key (sent as a bearer token)"
    )
    model: str | None = Field(None, description="the `model` sent upstream; default: the expert's name")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect timeout")
    max_context: int = Field(4096, ge=8, description="prompt + completion tokens the endpoint takes")
    max_retries: int = Field(
        2, ge=0, le=10, description="retries of a failed call (connection errors, 408, 409, 429, "
        "5xx) with exponential backoff that honours the endpoint's Retry-After"
    )
    timeout_s: float | None = Field(
        None, gt=0, description="longest one call may take (a stream: until its first token, and "
        "each gap between tokens), its retries included; default: the request's deadline"
    )
    allowed_fails: int = Field(
        3, ge=1, le=100, description="failed calls in a row (unreachable, 5xx, 429, timeout) "
        "that open the circuit breaker"
    )
    cooldown_s: float = Field(
        30.0, gt=0, description="how long an open breaker skips the endpoint (at least its "
        "Retry-After) before one trial call decides whether it closes"
    )
    logprobs: bool = Field(
        True, description="the endpoint returns logprobs (asked for, so the cascade can score the "
        "answer); false: never asked, and a request for them gets a 400"
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="the field the endpoint takes the token limit in (OpenAI's "
        "reasoning models take only max_completion_tokens)"
    )
    vllm_sampling: bool = Field(
        False, description="the endpoint takes vLLM's extra sampling fields (top_k, min_p, "
        "repetition_penalty, min_tokens, ignore_eos, stop_token_ids); false: a request that sets "
        "them gets a 400"
    )
