"""Tables. Every tenant-owned row carries `tenant_id`; services filter on it, so another tenant's id
is simply not found."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from service.jobs.states import Control, JobStatus, StepStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    operator: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))  # sft | preference | prompt | text
    rows: Mapped[int] = mapped_column(Integer)
    tokens_estimate: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[dict[str, int]] = mapped_column(
        JSON, default=dict, server_default="{}"
    )  # rows left out, by reason
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # expires_after


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftjob"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    status: Mapped[JobStatus] = mapped_column(
        String(24), default="queued"
    )  # moved only by service/jobs/lifecycle.py
    control: Mapped[Control | None] = mapped_column(String(16), nullable=True)  # asked of the worker
    method: Mapped[str] = mapped_column(String(24))
    model: Mapped[str] = mapped_column(String(255))
    reward_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    training_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    file_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    request: Mapped[dict[str, Any]] = mapped_column(
        JSON
    )  # the request as received (for idempotency and display)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)  # per step: the flat options its command runs with
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    steps: Mapped[list[int]] = mapped_column(JSON)
    step_status: Mapped[dict[str, StepStatus]] = mapped_column(JSON, default=dict)
    current_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # what the running step is doing (workers/watch.py): name, label, step, since, typical_s, bound_s
    phase: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    num_gpus: Mapped[int] = mapped_column(Integer, default=1)  # in all, over `nodes` (an even split)
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    gpu_type: Mapped[str] = mapped_column(String(32), default="cpu")
    max_cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_usd: Mapped[float] = mapped_column(Float, default=0.0)
    estimated_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    accrued_usd: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    output_dir: Mapped[str] = mapped_column(Text)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result_files: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # fine-tune-results files
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftevent"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    source_key: Mapped[str | None] = mapped_column(String(128), nullable=True)  # dedupes re-read step records
    __table_args__ = (UniqueConstraint("job_id", "source_key"),)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    global_step: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Float)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (UniqueConstraint("job_id", "step", "global_step"),)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    global_step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    __table_args__ = (UniqueConstraint("job_id", "step", "global_step"),)


class CheckpointShare(Base):
    """A checkpoint shared with another tenant (OpenAI's checkpoint permission; project id = tenant):
    that tenant may chat with it and fine-tune from it, and sees nothing else of the owner's."""

    __tablename__ = "checkpoint_shares"
    __table_args__ = (UniqueConstraint("checkpoint_id", "tenant_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cp"))
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("job_checkpoints.id"), index=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CostInterval(Base):
    """One accrual interval of one step of one job: the unique key makes a restart unable to count twice."""

    __tablename__ = "cost_intervals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    interval: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    usd: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("job_id", "step", "attempt", "interval"),)


class FineTunedModel(Base):
    __tablename__ = "fine_tuned_models"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # ft:<base>:<suffix>:<job_id>[:ema|:sft]
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UploadedModel(Base):
    """A base model a tenant uploaded (a Hugging Face directory); only that tenant sees or uses it."""

    __tablename__ = "uploaded_models"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("model"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    # a LoRA adapter (PEFT folder): the model it applies to, as the tenant names it; None: a whole model
    base: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class InferenceWorker(Base):
    """A live inference worker (`rlhf worker inference`): where it listens and what it holds.

    The worker writes its row at start, refreshes it every heartbeat (and whenever it loads or evicts
    a model) and deletes it on a clean exit; the API routes only to rows with a fresh heartbeat."""

    __tablename__ = "inference_workers"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("iw"))
    address: Mapped[str] = mapped_column(String(255))  # host:port of its gRPC endpoint
    hostname: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)  # model ids loaded, most recently used last
    loading: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # model ids being loaded now
    adapters: Mapped[list[str]] = mapped_column(JSON, default=list)  # LoRA adapters resident on its models
    max_models: Mapped[int] = mapped_column(Integer, default=2)  # LRU cap
    capacity: Mapped[int] = mapped_column(Integer, default=32)  # requests it serves at once
    active: Mapped[int] = mapped_column(Integer, default=0)  # requests being served at the last report
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class RateCounter(Base):
    """Requests or tokens counted per key and minute (service/limits.py) when there is no Redis."""

    __tablename__ = "rate_counters"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)  # what is counted, for whom
    window: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # minute since the epoch
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class Eval(Base):
    """OpenAI's eval: what items look like (`data_source_config`) and how to judge them (`testing_criteria`,
    graders in OpenAI's shapes)."""

    __tablename__ = "evals"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("eval"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    data_source_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    testing_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    eval_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class EvalRun(Base):
    """One run of an eval over a data source; executed by an evals worker under a lease (as jobs are)."""

    __tablename__ = "eval_runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evalrun"))
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)  # a job's own evals
    name: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(16))  # queued | in_progress | completed | failed | canceled
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    result_counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    per_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    usage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # per model: tokens and calls
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    run_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    control: Mapped[str | None] = mapped_column(String(16), nullable=True)  # cancel
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EvalOutputItem(Base):
    """One item's outcome in a run: the sample graded and each criterion's result. (run, item) is unique,
    so a run resumed after its worker died never grades an item twice."""

    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "item_index"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("outputitem"))
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id"), index=True)
    item_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))  # pass | fail
    datasource_item: Mapped[dict[str, Any]] = mapped_column(JSON)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class StoredResponse(Base):
    """A Responses API response kept for GET and for `previous_response_id` (with `store`, the default):
    the response object as answered and the conversation it ends (input turns and its reply, without
    `instructions`, which OpenAI does not carry over). Bounded per tenant (the oldest go first)."""

    __tablename__ = "responses"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("resp"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # the ResponseObject
    conversation: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # every turn, this reply last
    inputs: Mapped[int] = mapped_column(Integer)  # how many of the last turns (before the reply) it was given
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
