"""All service settings in one validated class (environment variables, `RLHF_` prefix; `DATABASE_URL`
and `REDIS_URL` as they are usually spelled).

Development defaults need nothing else on the machine (SQLite in the data directory, a Celery
transport on the filesystem); `environment=production` refuses those defaults.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlhf_engine import gpu_catalogue, sandbox


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(
        default=Path.home() / ".local" / "share" / "rlhf", description="files, runs, database"
    )
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("DATABASE_URL", "RLHF_DATABASE_URL"),
        description="SQLAlchemy URL; default: SQLite in data_dir",
    )
    redis_url: str = Field(
        default="",
        validation_alias=AliasChoices("REDIS_URL", "RLHF_REDIS_URL"),
        description="Celery broker; default: a filesystem transport in data_dir",
    )
    model_root: Path | None = Field(default=None, description="base models (default: data_dir/models)")
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    api_url: str = Field(
        default="",
        description="the API's base URL as training steps reach it (model graders' judges are asked "
        "through it); default http://HOST:PORT",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API"
    )
    metrics_public: bool = Field(default=False, description="serve /metrics without an operator key")
    console_dir: Path | None = Field(
        default=None,
        description="the web console's built files, served at /ui/ "
        "(default: service/console/dist, built by `make console`)",
    )
    auth_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="seconds an API server trusts a verified key without "
        "asking the database again: a revoked key stops working within this time (0: "
        "check every request)",
    )

    # limits on what a request may ask for
    max_file_bytes: int = 512 * 2**20
    max_model_bytes: int = 8 * 2**30
    max_body_bytes: int = 1 * 2**20
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a request body that sends nothing for this long, "
        "or falls behind min_body_bytes_per_s after it, is answered 408",
    )
    min_body_bytes_per_s: int = Field(
        default=64 * 2**10,
        ge=1,
        description="the slowest average body rate taken "
        "(after body_timeout_s): uploads slower than this are cut off",
    )
    max_gpus_per_job: int = 8
    gpu_types: list[str] = Field(
        default_factory=lambda: list(gpu_catalogue.OFFERED),
        description="GPU types jobs may ask for; each needs a price in rlhf_engine/gpu_catalogue.py",
    )
    gpu_memory_gib: dict[str, float] = Field(
        default_factory=dict,
        description="memory of GPU types the memory "
        'planner does not know (or a different figure), e.g. {"L40S-48G": 48}',
    )
    max_seq_len: int = 4096
    max_steps_per_stage: int = 1_000_000
    max_jobs_per_page: int = 100

    # workers
    heartbeat_s: float = Field(default=5.0, description="how often a training worker reports")
    lease_s: float = Field(
        default=30.0, description="a job whose worker has not reported for this long is re-queued"
    )
    sweep_s: float = Field(default=10.0, description="how often the sweeper looks for orphaned jobs")
    cost_interval_s: float = Field(default=10.0, description="cost is accrued once per interval")
    visibility_timeout_s: int = Field(default=3600, description="Redis redelivers an unacked task after this")
    step_grace_s: float = Field(
        default=60.0, description="time a step gets to checkpoint after a stop request"
    )
    step_restarts: int = Field(
        default=2,
        ge=0,
        description="times a step killed by a signal (e.g. the OOM killer) "
        "or stalled is restarted from its last checkpoint before the job fails",
    )
    stall_floor_s: float = Field(
        default=300.0,
        gt=0,
        description="the least time a step may spend in one phase without progress (a training step ending, "
        "rows tokenised, a batch evaluated) before it counts as stalled: it is ended, its cost stops, and it "
        "is restarted from its last checkpoint",
    )
    stall_factor: float = Field(
        default=5.0,
        ge=1,
        description="a phase without progress may last this many times its usual time "
        "(from the estimate, the step's own history or the model's size), and at least stall_floor_s",
    )
    prebuild_ops: bool = Field(
        default=True,
        description="a training worker builds the DeepSpeed ops it lacks (about a minute each) "
        "before it takes a job, so no job waits for them",
    )
    model_build_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="the longest a bundled base model may take to build, "
        "waiting for another builder included",
    )
    migrate_timeout_s: float = Field(
        default=300.0, gt=0, description="the longest a process waits for another one's database migration"
    )

    # where steps run (workers/launchers.py; docs/operations.md)
    launch_backend: Literal["local", "slurm", "kubernetes"] = Field(
        default="local",
        description="local: each step is a process group on the training worker's machine; slurm: each step "
        "is an sbatch job on the cluster; kubernetes: each step is a Kubeflow Trainer TrainJob (the run "
        "directory on storage the worker and the nodes share)",
    )
    max_nodes_per_job: int = Field(
        default=1,
        ge=1,
        description="most nodes one job may ask for (more than 1 needs launch_backend slurm or kubernetes)",
    )
    slurm_partition: str = Field(default="", description="sbatch --partition (empty: the cluster's default)")
    slurm_account: str = Field(default="", description="sbatch --account (empty: the user's default)")
    slurm_cpus_per_task: int = Field(
        default=0, ge=0, description="sbatch --cpus-per-task (0: Slurm's default)"
    )
    slurm_extra_args: list[str] = Field(
        default_factory=list,
        description='more #SBATCH lines, e.g. ["--qos=high", "--constraint=a100"]',
    )
    step_time_factor: float = Field(
        default=3.0,
        gt=0,
        description="a step's time limit on a cluster (Slurm --time, a TrainJob's activeDeadlineSeconds) is "
        "this many times its estimate",
    )
    step_min_time_min: int = Field(
        default=30, ge=1, description="the shortest --time a step is given (minutes)"
    )
    slurm_poll_s: float = Field(
        default=5.0, gt=0, description="how often a worker asks squeue about its step"
    )
    kube_api_url: str = Field(
        default="",
        description="the Kubernetes API server (empty: the pod's in-cluster configuration, else "
        "~/.kube/config)",
    )
    kube_namespace: str = Field(default="rlhf", description="the namespace TrainJobs are created in")
    kube_image: str = Field(
        default="", description="the image a TrainJob's pods run (docker/worker.Dockerfile's)"
    )
    kube_runtime: str = Field(
        default="rlhf-deepspeed",
        description="the Kubeflow Trainer ClusterTrainingRuntime a TrainJob references (DeepSpeed over "
        "OpenMPI; ours: docker/kubernetes/trainjob-runtime.yaml)",
    )
    kube_data_claim: str = Field(
        default="rlhf-data",
        description="the PersistentVolumeClaim (ReadWriteMany) holding RLHF_DATA_DIR, mounted at the same "
        "path in every pod of a TrainJob",
    )
    kube_service_account: str = Field(default="", description="the service account of a TrainJob's pods")
    kube_gpu_resource: str = Field(default="nvidia.com/gpu", description="the resource a GPU is requested as")
    kube_poll_s: float = Field(
        default=5.0, gt=0, description="how often a worker reads its TrainJob's status"
    )

    # python graders' sandbox (rlhf_engine/sandbox.py): what one batch of samples may use
    grader_memory_mb: int = Field(default=2048, ge=64, description="a python grader's address space")
    grader_cpu_s: int = Field(default=30, ge=1, description="CPU seconds one python grader batch may use")
    grader_wall_s: float = Field(
        default=60.0, gt=0, description="wall-clock seconds one python grader batch may take"
    )
    grader_output_kb: int = Field(default=1024, ge=1, description="what a python grader may print")
    embedding_model: str = Field(
        default="smollm2-135m-instruct",
        description="the model the cosine text-similarity grader embeds with (any served model; see "
        "/v1/embeddings)",
    )
    embedding_max_inputs: int = Field(
        default=2048, ge=1, le=2048, description="most inputs of one /v1/embeddings request"
    )

    # serving: inference workers and chat
    inference_host: str = Field(default="127.0.0.1", description="an inference worker's bind address")
    inference_port: int = Field(default=0, description="an inference worker's gRPC port (0: any free port)")
    inference_advertise: str = Field(
        default="",
        description="host:port the API reaches a worker at (default: the "
        "bind address and port; set it when binding 0.0.0.0)",
    )
    inference_token: str = Field(
        default="",
        description="shared secret the API sends to inference workers (set it "
        "wherever workers listen beyond loopback)",
    )
    inference_max_models: int = Field(default=2, ge=1, description="models one worker keeps loaded (LRU)")
    inference_capacity: int = Field(default=64, ge=1, description="requests one worker serves at once")
    inference_backend: Literal["auto", "transformers", "deepspeed"] = "auto"
    inference_device: str = Field(default="auto", description="cpu, cuda, cuda:N (auto: cuda when available)")
    inference_dtype: Literal["auto", "fp32", "bf16", "int8"] = Field(
        default="auto",
        description="weights for decoding: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 (half the bytes per "
        "token; CPUs with AVX-512 BF16/AMX), int8 (weight-only int8 linear layers, torchao); training keeps "
        "its own precision",
    )
    inference_threads: int = Field(
        default=0, ge=0, description="torch threads of an inference worker (0: torch's default, one per core)"
    )
    inference_prefix_cache_mb: float = Field(
        default=256.0,
        ge=0,
        description="memory per loaded model for recent "
        "prompts' and replies' keys/values, reused by a tenant's prompts that "
        "start alike (system prompt, a conversation's earlier turns); 0: off",
    )
    inference_adapter_cache_mb: float = Field(
        default=512.0,
        ge=0,
        description="memory per loaded model for the LoRA adapters kept resident on it (least recently "
        "used evicted first, never one a request uses)",
    )
    inference_heartbeat_s: float = Field(default=2.0, gt=0, description="how often a worker reports")
    inference_ttl_s: float = Field(
        default=10.0, gt=0, description="a worker silent this long gets no requests"
    )
    route_cache_s: float = Field(
        default=0.5,
        ge=0,
        description="seconds the API reuses its view of the live "
        "inference workers (a new worker gets requests within this time; 0: read it for "
        "every request)",
    )
    chat_max_tokens: int = Field(default=2048, ge=1, description="largest max_tokens a request may ask for")
    chat_default_max_tokens: int = Field(
        default=256, ge=1, description="max_tokens when a request gives none"
    )
    chat_max_n: int = Field(default=8, ge=1, description="largest n")
    chat_max_messages: int = Field(default=256, ge=1, description="most messages in one request")
    responses_max_stored: int = Field(
        default=10_000,
        ge=1,
        description="Responses API: stored responses kept per tenant (the oldest are dropped beyond it)",
    )
    chat_max_message_chars: int = Field(default=65536, ge=1, description="longest message content")
    chat_timeout_s: float = Field(
        default=300.0, gt=0, description="a chat request ends with a timeout after this"
    )
    inference_load_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="the longest a request waits for its model to load on a worker (another request's load "
        "included) before it is answered 503",
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of a 503 (no worker, no dependency)")
    # limits and quotas (0 = off): over one → 429 rate_limit_error with Retry-After; counted in Redis when
    # REDIS_URL is set (shared by every API process), else in the database
    rate_limit_per_minute: int = Field(
        default=0, ge=0, description="requests per minute per API key, every /v1 route (chat included)"
    )
    chat_tokens_per_minute: int = Field(
        default=0,
        ge=0,
        description="streamed completion tokens per minute per "
        "API key; a chat request over it is refused until the minute ends",
    )
    rate_window_s: int = Field(
        default=60,
        ge=1,
        description="seconds in the fixed window the per-minute limits count in (windows start at the "
        "epoch): 60, a minute, is what their names and 429 messages say; tests set a window that does not "
        "end during their run, so that no count resets mid-test",
    )
    max_active_jobs: int = Field(
        default=0, ge=0, description="live jobs (queued, running, paused) per tenant"
    )
    max_queued_gpu_hours: float = Field(
        default=0.0, ge=0, description="estimated GPU-hours of a tenant's live jobs, the new one included"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        unpriced = gpu_catalogue.unpriced(self.gpu_types)
        if unpriced:  # every job is priced: a type without a price would fail every estimate
            raise ValueError(
                f"gpu_types: {', '.join(unpriced)} has no price in rlhf_engine/gpu_catalogue.py "
                f"(priced: {', '.join(gpu_catalogue.PRICE_PER_HOUR)}); add one there or drop it"
            )
        for arg in self.slurm_extra_args:  # each becomes one `#SBATCH` line of every step's script
            if not re.fullmatch(r"--[a-z][a-z0-9-]*(=[^\s'\"`$;|&<>]+)?", arg):
                raise ValueError(
                    f"slurm_extra_args: {arg!r} is not one sbatch option (--name or --name=value, "
                    "no spaces or shell characters)"
                )
        if self.launch_backend == "kubernetes" and not self.kube_image:
            raise ValueError("kube_image: the kubernetes launch backend needs the image its TrainJobs run")
        for field in ("slurm_partition", "slurm_account"):  # each goes into an #SBATCH line
            if not re.fullmatch(r"[A-Za-z0-9_.,-]*", getattr(self, field)):
                raise ValueError(f"{field}: letters, digits, '_', '.', ',' and '-' only")
        if self.max_nodes_per_job > 1 and self.launch_backend == "local":
            raise ValueError(
                f"max_nodes_per_job: {self.max_nodes_per_job} needs launch_backend slurm "
                "(the local backend runs a step on one machine)"
            )
        if self.environment == "production":
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise ValueError("production needs DATABASE_URL pointing at PostgreSQL")
            if not self.redis_url:
                raise ValueError("production needs REDIS_URL")
            if not self.inference_token:
                raise ValueError(
                    "production needs RLHF_INFERENCE_TOKEN (inference workers trust only the API)"
                )
            if "*" in self.cors_origins:
                raise ValueError("production refuses cors_origins '*'; list the front ends' origins")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'rlhf.db'}"

    @property
    def models_dir(self) -> Path:
        return self.model_root or self.data_dir / "models"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def internal_url(self) -> str:
        """Where a training step reaches the API (api_url, else this host and port)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return (self.api_url or f"http://{host}:{self.port}").rstrip("/")

    def grader_limits(self) -> sandbox.Limits:
        """What one python grader batch may use, as the sandbox takes it."""
        return sandbox.Limits(
            memory_bytes=self.grader_memory_mb << 20,
            cpu_seconds=self.grader_cpu_s,
            wall_seconds=self.grader_wall_s,
            output_bytes=self.grader_output_kb << 10,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
