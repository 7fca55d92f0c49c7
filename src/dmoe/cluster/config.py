"""The one typed configuration of a dmoe cluster: the gateway's, the replicas', and Ray Serve's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmoe.config import ConfigError, format_validation_error
from dmoe.runtime import LOOPBACK_HOSTS

APP_NAME = "dmoe"


def ray_auth_env(start_head: bool = False) -> None:
    """Ray's token authentication: on for a head ``dmoe cluster up`` starts, and for joining any
    cluster whose token is in ~/.ray/auth_token (a joining driver does not switch it on by
    itself). Ray reads this when it is first imported: call before ``import ray``."""
    if "RAY_AUTH_MODE" not in os.environ and (start_head or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


class ClusterConfig(BaseModel):
    """Everything ``dmoe cluster up`` deploys; also the ``args`` of a ``serve deploy`` config file."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(default=None, description="HF directory or .gguf file, on every node; None = the embedded base")
    experts_dir: str | None = Field(default=None, description="experts registered at start (read on the gateway's node only)")
    roots: list[str] = Field(default_factory=list, description="more folders POST /v1/experts may read (gateway's node)")
    engine: Literal["torch", "llamacpp"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    replicas: int = Field(default=1, ge=1, le=1024, description="replicas when autoscaling is off")
    autoscale: bool = Field(default=False, description="Ray Serve autoscaling between min_replicas and max_replicas")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0, description="autoscaling: requests in flight per replica")
    upscale_delay_s: float = Field(default=30.0, ge=0, description="autoscaling: load above target this long adds replicas")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="autoscaling: load below target this long removes them")
    replica_cpus: float = Field(default=0.5, gt=0, description="CPUs per replica (num_cpus=1 per replica hangs on 2 cores)")
    replica_gpus: float = Field(default=0.0, ge=0)
    replica_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    gateway_cpus: float = Field(default=0.25, ge=0)
    max_ongoing_requests: int = Field(default=16, ge=1, description="per replica, Ray Serve's back-pressure")
    max_models_per_replica: int = Field(default=0, ge=0, description="0 = as many as there are experts, plus room (no churn)")
    max_batch: int = Field(default=8, ge=1)
    max_seq: int = Field(default=2048, ge=16)
    max_loras: int = Field(default=0, ge=0, description="adapter slots per replica; 0 = max_models_per_replica + 2")
    max_rank: int = Field(default=64, ge=1)
    max_queue: int = Field(default=64, ge=0)
    routing: Literal["threshold", "top1", "topk", "load", "latency"] = "threshold"
    aggregate: Literal["weighted", "vote", "ensemble"] = "weighted"
    k: int = Field(default=2, ge=1, le=8)
    timeout_s: float = Field(default=60.0, gt=0, description="per expert call, before failover")
    retries: int = Field(default=2, ge=0, le=10, description="other replicas tried for one expert before falling back")
    keywords: str | None = Field(default=None, description="keyword rules when the experts have no trained router")
    use_router: bool = True
    api_key: str | None = None
    ingress: Literal["gateway", "ray"] = Field(default="gateway", description=
        "who takes HTTP: the gateway replica itself (one Ray hop per request) or Ray Serve's proxy (two)")
    host: str = Field(default="127.0.0.1", description="the gateway's HTTP address")
    port: int = Field(default=8081, ge=0, le=65535)
    lenient: bool = False
    routing_stats_period_s: float = Field(default=1.0, gt=0, description="how often replicas report latency to the router")
    step_delay_s: float = Field(default=0.0, ge=0, le=10, description="fault injection: a pause after every engine step")

    @classmethod
    def make(cls, **values: Any) -> ClusterConfig:
        try:
            cfg = cls(**values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, "cluster options")) from None
        if cfg.autoscale and cfg.min_replicas > cfg.max_replicas:
            raise ConfigError(f"min_replicas {cfg.min_replicas} is above max_replicas {cfg.max_replicas}")
        return cfg

    def autoscaling(self) -> dict[str, float]:
        """Ray Serve's ``autoscaling_config`` for the replica deployment."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}

    def replica_actor_options(self) -> dict[str, Any]:
        """Ray's ``ray_actor_options`` for a replica: CPUs, GPUs, custom resources."""
        actor: dict[str, Any] = {"num_cpus": self.replica_cpus}
        if self.replica_gpus:
            actor["num_gpus"] = self.replica_gpus
        if self.replica_resources:
            actor["resources"] = dict(self.replica_resources)
        return actor

    def with_experts(self, n_experts: int) -> ClusterConfig:
        """Sizes that follow the number of experts: every replica can hold every expert."""
        models = self.max_models_per_replica or max(n_experts + 4, 8)
        return self.model_copy(update={"max_models_per_replica": models, "max_loras": self.max_loras or models + 2})

    def allowed_hosts(self) -> list[str] | None:
        return list(LOOPBACK_HOSTS) if self.host in ("127.0.0.1", "localhost", "::1") else None

    def all_roots(self) -> list[Path]:
        return ([Path(self.experts_dir)] if self.experts_dir else []) + [Path(r) for r in self.roots]
