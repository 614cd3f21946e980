"""The API contract: request and response bodies (OpenAI's shapes where OpenAI has the concept).

These pydantic models are the single source for REST and gRPC; the proto mirrors them. Per-step
configuration is not re-declared here: `config.sft|reward|ppo` take exactly the fields of the
engine's SFTConfig / RewardConfig / PPOConfig dataclasses and are checked by them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from service.jobs.states import JobStatus, StepStatus


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIRequest(BaseModel):
    """A request in OpenAI's shape: parameters we do not support are refused by name, not ignored —
    unless given at their neutral value (`NEUTRAL`: what the parameter is when it changes nothing)."""

    model_config = ConfigDict(extra="allow")
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def unsupported(self) -> str | None:
        """The first parameter this server does not support (with a value that would change the answer)."""
        for name, value in (self.model_extra or {}).items():
            if value is None or value in self.NEUTRAL.get(name, ()):
                continue
            return name
        return None


def checked_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata bounds (jobs, responses)."""
    if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
        raise ValueError("at most 16 keys of ≤ 64 characters with values of ≤ 512 characters")
    return v


class Page(BaseModel):
    """Every list pages one way: ask with `after` (the `id` of the last item of the previous page) and
    `limit`; `has_more` says whether to ask again."""

    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False
    first_id: str | None = Field(default=None, description="the id of the first item on this page")
    last_id: str | None = Field(
        default=None, description="the id of the last item: pass it as `after` for the next page"
    )


# ---------------------------------------------------------------------------- files


FilePurpose = Literal["fine-tune", "fine-tune-results", "evals", "user_data"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = "processed"
    expires_at: int | None = Field(default=None, description="Unix seconds when it expires (expires_after)")
    format: str = Field(
        description="the data layer's detected row shape, e.g. prompt_chosen_rejected (raw: user_data, "
        "csv: results)"
    )
    kind: str = Field(
        description="sft, preference, prompt (prompts only: step 3), text; none (user_data), results"
    )
    rows: int = Field(description="rows read (after empty/invalid rows were counted out)")
    skipped: dict[str, int] = Field(
        default_factory=dict,
        description="rows left out, by reason (empty_answer, "
        "unusable: <what is wrong>); above the file's max_bad_rows share the upload is "
        "refused instead",
    )


class FileList(Page):
    data: list[FileObject]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# ---------------------------------------------------------------------------- jobs


class WandbIntegration(Strict):
    """OpenAI's wandb integration. The API key is not part of it: workers read WANDB_API_KEY from their
    own environment, so a key never enters the database or the logs."""

    project: str = Field(min_length=1, max_length=128, pattern=r"^[\w.\- ]+$", description="W&B project")
    name: str | None = Field(default=None, max_length=128, description="run name (each step adds a suffix)")
    entity: str | None = Field(default=None, max_length=128, description="W&B team or user")
    tags: list[str] | None = Field(default=None, max_length=32, description="run tags")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not 0 < len(t) <= 64 for t in v):
            raise ValueError("each tag: 1 to 64 characters")
        return v


class Integration(Strict):
    type: Literal["wandb"] = Field(description="only wandb (Weights & Biases) here")
    wandb: WandbIntegration


class Hyperparameters(Strict):
    n_epochs: int | Literal["auto"] = Field(
        default="auto",
        description="epochs of steps 1-2 and 3 (auto: 3, more for small files so ≥ 100 examples are "
        "seen, fewer for large ones — OpenAI's rule — unless preset or config set them)",
    )
    batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="examples per optimiser step (steps 1-2: rows, step 3: prompts); the micro-batch and "
        "accumulation follow from it (auto: ≈0.2% of the training rows, 1 to 256, unless preset or "
        "config set them)",
    )
    learning_rate_multiplier: float | Literal["auto"] = Field(
        default="auto",
        description="× each step's default learning rate (auto: 1 up to 10M parameters, 1/√(params/10M) "
        "above, unless preset or config set it)",
    )

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 10_000:
            raise ValueError("must be between 1 and 10000")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 1000:
            raise ValueError("must be > 0 and at most 1000")
        return v


class MethodParams(Strict):
    hyperparameters: Hyperparameters | None = None


class DPOHyperparameters(Hyperparameters):
    beta: float | Literal["auto"] = Field(
        default="auto",
        description="DPO's beta: how strongly the model is held "
        "to its SFT starting point (auto: 0.1, or the preset's)",
    )

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 100:
            raise ValueError("must be > 0 and at most 100")
        return v


class DPOMethodParams(Strict):
    hyperparameters: DPOHyperparameters | None = None
    sft_first: bool = Field(
        default=False,
        description="ours: DeepSpeed-Chat's order — SFT on 40% of the pairs' chosen answers first, then "
        "DPO on the other 60% (data_split 4,6,0); without it (OpenAI's meaning) DPO trains the given "
        "model on all the pairs",
    )


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters (every field of the SDK's), "auto" or a value."""

    eval_interval: int | Literal["auto"] = Field(
        default="auto", description="evaluate on the validation prompts every N steps"
    )
    eval_samples: int | Literal["auto"] = Field(
        default="auto", description="validation prompts per evaluation (at most the validation rows)"
    )
    compute_multiplier: float | Literal["auto"] = Field(
        default="auto", description="× the answers sampled per prompt (4 at 1; at least 2)"
    )
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = Field(
        default=None,
        description="the answer-length budget: low ½, default/medium 1, high 2 × max_answer_len",
    )

    @field_validator("eval_interval", "eval_samples")
    @classmethod
    def _count(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 100_000:
            raise ValueError("must be between 1 and 100000")
        return v

    @field_validator("compute_multiplier")
    @classmethod
    def _multiplier(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 10:
            raise ValueError("must be > 0 and at most 10")
        return v


class ReinforcementMethodParams(Strict):
    grader: dict[str, Any] | None = Field(
        default=None,
        description="the reward as a grader (string_check, "
        "text_similarity, score_model, multi; python is refused): step 3 runs "
        "GRPO on the prompts with it (config.ppo.algorithm selects rloo or "
        "grpo), after SFT when the training file has answers; without it, "
        "reward_model is trained in step 2 (RLHF)",
    )
    hyperparameters: ReinforcementHyperparameters | None = None
    response_format: ResponseFormat | None = Field(
        default=None,
        description="with a JSON schema, step 3 samples every answer under it (constrained decoding), so "
        "graders can read {{sample.output_json.<field>}}",
    )


class Method(Strict):
    type: Literal["supervised", "reinforcement", "dpo"] = Field(
        description="supervised: step 1; reinforcement: steps 1→2→3 with reward_model (RLHF), "
        "or step 3 with a grader (after step 1 when the data has answers); "
        "dpo: DPO of the given model on the preference pairs (no reward model; sft_first: SFT first)"
    )
    supervised: MethodParams | None = None
    reinforcement: ReinforcementMethodParams | None = None
    dpo: DPOMethodParams | None = None


class StepConfigs(Strict):
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields for step 1")
    reward: dict[str, Any] = Field(default_factory=dict, description="RewardConfig fields for step 2")
    ppo: dict[str, Any] = Field(default_factory=dict, description="PPOConfig fields for step 3")
    dpo: dict[str, Any] = Field(default_factory=dict, description="DPOConfig fields for step 2 of a dpo job")


class JobEval(Strict):
    """An eval a job runs on its model: on each checkpoint of its last step and on the final model
    (`every: checkpoint`), or on the final model only (`final`). `data_source` is an eval run's
    completions source without `model` (the job fills it in): input_messages, sampling_params, source."""

    eval_id: str = Field(max_length=64)
    every: Literal["checkpoint", "final"] = "final"
    data_source: dict[str, Any]


class JobCreate(Strict):
    model: str = Field(max_length=255, description="the actor: a base model name or a fine-tuned model id")
    training_file: str | None = Field(default=None, max_length=64, description="file id (purpose fine-tune)")
    validation_file: str | None = Field(
        default=None,
        max_length=64,
        description="file id in the training file's format: every step evaluates on it (valid_*, "
        "full_valid_*) and nothing of the training file is held out",
    )
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(default=None, max_length=64, description="part of the fine-tuned model's id")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = Field(
        default=None,
        max_length=1,
        description="OpenAI's: [{type: wandb, wandb: {project, name, entity, tags}}]",
    )
    # ours
    evals: list[JobEval] | None = Field(
        default=None,
        max_length=4,
        description="evals to run on the job's model as it trains (docs/evals.md, 'During a job')",
    )
    reward_model: str | None = Field(
        default=None, max_length=255, description="base model to train as reward model"
    )
    steps: list[int] | None = Field(default=None, description="steps to run (default from method)")
    data_split: str | None = Field(
        default=None, max_length=32, description="shares of the data for steps 1,2,3"
    )
    preference_file: str | None = Field(
        default=None, max_length=64, description="file id for step 2 (and 3's prompts)"
    )
    prompt_file: str | None = Field(default=None, max_length=64, description="file id for step 3's prompts")
    pretrain_file: str | None = Field(
        default=None, max_length=64, description="plain-text file id for PPO-ptx"
    )
    preset: str | None = Field(default=None, max_length=64, description="a shipped config preset, e.g. tiny")
    config: StepConfigs | None = None
    num_gpus: int = Field(default=1, ge=1, le=4096, description="GPUs in all (on every node together)")
    nodes: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="machines the job's steps run on (more than 1: a Slurm or Kubernetes server)",
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="GPUs on each node; num_gpus = nodes × gpus_per_node (default: num_gpus / nodes)",
    )
    gpu_type: str = Field(default="cpu", max_length=32)
    max_cost_usd: float | None = Field(default=None, gt=0)
    memory: Literal["auto", "fixed"] = Field(
        default="auto",
        description="auto: a step whose options do not fit "
        "on num_gpus × gpu_type takes the memory planner's fastest configuration "
        "that does (keeping the options you set); fixed: as configured, or 400",
    )

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("may hold letters, digits, '.', '_' and '-' only (1-64 characters)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return checked_metadata(v)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Cost(BaseModel):
    estimated_usd: float
    accrued_usd: float
    gpu_seconds: float
    max_cost_usd: float | None = None
    judge_requests: int = Field(default=0, description="prompts its model graders sent to judge models")
    judge_tokens: int = Field(default=0, description="tokens those judge requests read and wrote")


class JobPhase(BaseModel):
    """What a running job does now, so that "running, 0%" never hides a wait."""

    name: str = Field(
        description="scheduled (waiting in a cluster scheduler's queue), starting, preparing_model, "
        "building_ops, tokenizing, loading_model, restoring_checkpoint, evaluating, training, "
        "saving_checkpoint or saving_model"
    )
    description: str = Field(
        description="as a person reads it, e.g. 'building DeepSpeed ops: 38 s, usually 45 s'"
    )
    step: int | None = Field(
        default=None, description="the job's step it belongs to (none: the worker's own work)"
    )
    started_at: int = Field(description="Unix seconds")
    elapsed_s: float
    typical_s: float | None = Field(
        default=None,
        description="how long it usually takes (the estimate, the step's own history, the models' size)",
    )
    bound_s: float = Field(
        description="how long it may go without progress before the step counts as stalled "
        "and is ended and retried"
    )


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: JobStatus
    training_file: str | None
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    integrations: list[Any] = Field(default_factory=list)
    # ours
    evals: list[Any] = Field(default_factory=list, description="the evals it runs on its checkpoints")
    reward_model: str | None
    steps: list[int]
    current_step: int | None
    step_status: dict[str, StepStatus]
    progress: float
    phase: JobPhase | None = None
    cost: Cost
    num_gpus: int
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_type: str


class JobList(Page):
    data: list[JobObject]


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class EventList(Page):
    data: list[EventObject]


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    step: int = Field(description="which RLHF step (1, 2, 3) the checkpoint belongs to")


class CheckpointList(Page):
    data: list[CheckpointObject]


class CheckpointPermission(BaseModel):
    """OpenAI's checkpoint permission: the checkpoint shared with a project (here: a tenant)."""

    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str = Field(description="the tenant it is shared with")


class CheckpointPermissionList(Page):
    data: list[CheckpointPermission]


class PermissionCreate(Strict):
    project_ids: list[str] = Field(
        min_length=1,
        max_length=100,
        description="the tenants (OpenAI: projects) to share the checkpoint with",
    )


class MetricPoint(BaseModel):
    id: int = Field(description="the point's position: pass it as `after` for the next page")
    step: int
    global_step: int
    time: float
    values: dict[str, Any]


class MetricList(Page):
    data: list[MetricPoint]
    first_id: int | None = None  # type: ignore[assignment]  # (positions)
    last_id: int | None = None  # type: ignore[assignment]


class RolloutList(Page):
    data: list[dict[str, Any]]
    first_id: int | None = None  # type: ignore[assignment]  # (positions)
    last_id: int | None = None  # type: ignore[assignment]


class StepEstimate(BaseModel):
    step: int
    tokens: int
    seconds: float
    usd: float


class StepMemory(BaseModel):
    step: int
    method: str = Field(description="sft, reward, dpo, ppo, grpo or rloo")
    configuration: str = Field(description="the configuration planned, e.g. 'ZeRO-3, gradient checkpointing'")
    changed: bool = Field(description="the planner changed the step's options to fit (memory: auto)")
    step_options: dict[str, Any] = Field(description="the step options of that configuration")
    per_gpu_bytes: int = Field(description="planned peak bytes per GPU (per process on cpu)")
    gpu_bytes: int | None = Field(description="one GPU's memory (null on cpu)")
    headroom_bytes: int | None
    fits: bool | None = Field(description="null on cpu (no GPU to fit)")
    host_bytes_per_node: int = Field(description="host memory the offloaded states take per node")
    peak_phase: str = Field(description="the phase of the step that peaks (training, generation, …)")


class Estimate(BaseModel):
    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    seconds: float
    hours: float
    usd: float
    gpu_type: str
    num_gpus: int
    nodes: int = 1
    price_per_gpu_hour: float
    steps: list[StepEstimate]
    memory: list[StepMemory] = Field(
        default_factory=list, description="per step: the memory plan on these GPUs"
    )


class EstimateRequest(JobCreate):
    tokens: dict[str, int] | None = Field(
        default=None, description="tokens per step ({'3': 135000000}) to plan without data files"
    )
    model_parameters: int | None = Field(
        default=None, gt=0, description="actor size when the model is not here"
    )
    reward_model_parameters: int | None = Field(default=None, gt=0, description="reward model size, likewise")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    ready: bool = Field(
        default=True,
        description="false while a bundled model is built on first use; a chat for it then "
        "answers 503 with Retry-After at once, and the build goes on",
    )
    parent: str | None = Field(
        default=None,
        description="for a LoRA adapter: the model it is served on (one copy of the base serves all its "
        "adapters); null for a whole model",
    )


class ModelList(Page):
    data: list[ModelObject]


# ---------------------------------------------------------------------------- chat


class ContentPart(Strict):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class FunctionCall(BaseModel):
    name: str = Field(max_length=64, description="the function called")
    arguments: str = Field(description="its arguments: a JSON object, as text")


class ToolCall(BaseModel):
    """A call the assistant made (in a reply, or given back in a later request's conversation)."""

    id: str = Field(max_length=128, description="call_…: a tool message answers it by this id")
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="letters, digits, _ and -")
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = Field(
        default=None, description="a JSON schema of the arguments (default: no arguments)"
    )
    strict: bool | None = Field(
        default=None, description="accepted; required and named calls always follow it"
    )


class ToolDefinition(Strict):
    type: Literal["function"] = Field(description="only function tools")
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is taken as system; tool: a tool's result (with tool_call_id)"
    )
    content: str | list[ContentPart] | None = Field(
        default=None, description="the turn's text (or a list of text parts); null for a turn of only calls"
    )
    name: str | None = Field(
        default=None, max_length=64, description="accepted, not used by the prompt formatter"
    )
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(default=None, max_length=128, description="the call a tool turn answers")

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                "content is required (only an assistant turn that calls tools may leave it null)"
            )
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the call it answers)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = Field(
        default=False, description="send a last chunk with usage (and usage: null before)"
    )


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="the schema's name")
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="a JSON schema (default: any JSON object)"
    )
    strict: bool | None = Field(
        default=None, description="accepted; replies always follow the schema (constrained decoding)"
    )


class ResponseFormat(Strict):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, description="with type json_schema")


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's chat-completions request; parameters we do not support are refused by name, not ignored."""

    model: str = Field(max_length=255, description="a base model name or one of your fine-tuned model ids")
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, oldest first")
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="newer name of max_tokens")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy (default 1)")
    top_p: float | None = Field(default=None, gt=0, le=1, description="nucleus sampling (default 1)")
    stop: str | list[str] | None = Field(default=None, description="strings that end a reply, at most 4")
    n: int | None = Field(default=None, ge=1, description="replies to generate (default 1)")
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="the same seed gives the same tokens"
    )
    stream: bool = Field(default=False, description="send chat.completion.chunk events over SSE, then [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, description="accepted for compatibility, not used")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="json_schema: every reply follows the schema (constrained decoding); json_object: every "
        "reply is a JSON object; text: the default",
    )
    tools: list[ToolDefinition] | None = Field(
        default=None, max_length=128, description="functions the model may call (shown to it by its template)"
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="auto (default with tools): the model decides; required: it calls one or more; "
        "{type: function, function: {name}}: it calls that one; none: it answers in text. required and named "
        "calls always follow the schema (constrained decoding)",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: at most one call per reply (default true)"
    )
    logprobs: bool | None = Field(
        default=None,
        description="return each generated token's log-probability: the model's own distribution, before "
        "temperature, penalties, logit_bias and response_format",
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="with logprobs: also the most likely tokens at each position"
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        max_length=1024,
        description="token id (a string, as JSON keys are) -> bias from -100 to 100 added to its logit "
        "before sampling; -100 bans the token, 100 all but forces it",
    )
    presence_penalty: float | None = Field(
        default=None,
        ge=-2,
        le=2,
        description="subtracted from the logit of each token the reply already holds",
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="times a token's count in the reply, subtracted from its logit"
    )

    _grammar: str | None = PrivateAttr(default=None)  # response_format compiled (service/services/chat.py)

    @property
    def grammar(self) -> str | None:
        return self._grammar

    @grammar.setter
    def grammar(self, value: str | None) -> None:
        self._grammar = value

    # OpenAI parameters accepted only at their neutral value; anything else unknown is refused by name
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "store": (False,),
        "metadata": ({},),
        "service_tier": ("auto",),
    }

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"key {token!r} must be a token id (a whole number, as a string)")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} ({bias}) must be between -100 and 100")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(BaseModel):
    token: str = Field(description="the token's text")
    logprob: float
    bytes: list[int] | None = Field(description="its UTF-8 bytes (a token may hold part of a character)")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the most likely tokens there, most likely first")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = Field(description="one per generated token, in order")
    refusal: None = None


class ToolCallDelta(BaseModel):
    index: int = Field(description="which call of the reply")
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, description="each call whole, once")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = Field(default=None, description="with logprobs: this chunk's tokens'")
    reward: float | None = Field(
        default=None, description="the run's reward model's score of the reply (last chunk)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="the reply's text (null when it only calls tools)")
    refusal: None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="the calls it made")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = Field(default=None, description="with logprobs: the reply's tokens'")
    reward: float | None = Field(default=None, description="the run's reward model's score of the reply")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


# ---------------------------------------------------------------------------- responses


class ResponseTextFormat(BaseModel):
    """OpenAI's `text.format`: text, json_object, or json_schema with its fields flat."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema", description="with json_schema")
    description: str | None = Field(default=None, max_length=4096)
    strict: bool | None = Field(default=None, description="accepted; replies always follow the schema")


class ResponseText(Strict):
    format: ResponseTextFormat | None = None
    verbosity: Literal["medium"] | None = Field(default=None, description="accepted at its default only")


class ResponseCreateRequest(OpenAIRequest):
    """OpenAI's Responses API request: a chat turn in another envelope (the same engine, limits and token
    accounting as /v1/chat/completions). Parameters we do not support are refused by name."""

    model: str = Field(max_length=255, description="a base model name or one of your fine-tuned model ids")
    input: str | list[dict[str, Any]] = Field(
        description="a text (the user's turn), or a list of items, oldest first: messages {role, content} "
        "(content a text or input_text/output_text parts), function_call and function_call_output"
    )
    instructions: str | None = Field(
        default=None, description="a system message first; not carried over by previous_response_id"
    )
    previous_response_id: str | None = Field(
        default=None, max_length=64, description="continue that stored response's conversation"
    )
    max_output_tokens: int | None = Field(default=None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy (default 1)")
    top_p: float | None = Field(default=None, gt=0, le=1, description="nucleus sampling (default 1)")
    text: ResponseText | None = Field(
        default=None,
        description="format: json_schema or json_object constrain the reply (structured outputs)",
    )
    store: bool = Field(
        default=True, description="keep the response (GET it, continue it with previous_response_id)"
    )
    stream: bool = Field(default=False, description="send typed events over SSE (response.created …)")
    metadata: dict[str, str] | None = Field(default=None, description="at most 16 keys, kept with it")
    user: str | None = Field(default=None, max_length=256, description="accepted for compatibility, not used")
    safety_identifier: str | None = Field(default=None, max_length=256, description="accepted, not used")
    prompt_cache_key: str | None = Field(
        default=None, max_length=256, description="accepted; prompts are cached per tenant anyway"
    )
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=128,
        description="function tools {type: function, name, description, parameters, strict}",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="auto, none, required, or {type: function, name}"
    )
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call")

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "truncation": ("disabled",),
        "service_tier": ("auto", "default"),
        "background": (False,),
        "include": ([],),
        "reasoning": ({},),
        "stream_options": ({},),
    }

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return checked_metadata(v)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    """A call the model made (Responses API): answer it with a `function_call_output` input item."""

    id: str = Field(description="fc_…")
    type: Literal["function_call"] = "function_call"
    status: Literal["completed"] = "completed"
    call_id: str = Field(description="call_…: the function_call_output that answers it names this")
    name: str
    arguments: str = Field(description="a JSON object, as text")


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    id: str = Field(description="resp_…")
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage | FunctionCallItem]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    parallel_tool_calls: bool = True
    tool_choice: str = "auto"
    tools: list[Any] = Field(default_factory=list)
    truncation: str = "disabled"
    user: str | None = None
    reward: float | None = Field(default=None, description="the run's reward model's score of the reply")


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    status: Literal["completed"] = "completed"
    content: list[dict[str, Any]] = Field(description="input_text (or output_text for assistant) parts")


class FunctionCallOutputItem(BaseModel):
    id: str
    type: Literal["function_call_output"] = "function_call_output"
    status: Literal["completed"] = "completed"
    call_id: str
    output: str


class ResponseInputItemList(Page):
    data: list[InputMessage | FunctionCallItem | FunctionCallOutputItem]


class EmbeddingRequest(Strict):
    """OpenAI's embeddings request."""

    model: str = Field(max_length=255, description="any model GET /v1/models lists (a chat model embeds too)")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts (at most 2048), a list of token ids, or a list of such lists"
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: lists of numbers; base64: little-endian float32 bytes, base64"
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="keep the first n components, normalised again (at most the model's)"
    )
    user: str | None = Field(default=None, max_length=256, description="accepted for compatibility, not used")

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list (one text or one token list is a list of one)."""
        given: Any = self.input
        if isinstance(given, str):
            return [given]
        if given and all(isinstance(t, int) for t in given):
            return [given]
        out: list[str] | list[list[int]] = given
        return out


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="the unit vector (a base64 string with encoding_format)")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------------------- errors


class ErrorObject(BaseModel):
    message: str = Field(description="what is wrong and how to fix it")
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error, rate_limit_error, "
        "service_unavailable, timeout or server_error"
    )
    param: str | None = Field(default=None, description="the request field at fault, when one is")
    code: str | None = Field(default=None, description="a machine-readable reason, e.g. model_not_ready")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every error of the API has this body (service/errors.py)."""

    error: ErrorObject


# ---------------------------------------------------------------------------- graders


class GraderValidateRequest(Strict):
    grader: dict[str, Any] = Field(
        description="a grader in OpenAI's shape: string_check, text_similarity, "
        "score_model or multi (python graders are refused)"
    )


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any]


class GraderRunRequest(Strict):
    grader: dict[str, Any] = Field(description="the grader (score_model graders run inside jobs only)")
    model_sample: str = Field(
        max_length=100_000, description="the model's answer to grade ({{sample.output_text}})"
    )
    item: dict[str, Any] | None = Field(
        default=None, description="the training row its templates read ({{item.<field>}})"
    )


class GraderRunResponse(BaseModel):
    reward: float
    sub_rewards: dict[str, float] = Field(description="each named part's score (multi: its graders)")
    metadata: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]


# ---------------------------------------------------------------------------- evals (OpenAI's Evals API)


class EvalCreate(Strict):
    name: str | None = Field(default=None, max_length=255)
    data_source_config: dict[str, Any] = Field(
        description="{type: custom, item_schema: a JSON schema of the items, include_sample_schema}"
    )
    testing_criteria: list[dict[str, Any]] = Field(
        description="graders in OpenAI's shapes (string_check, text_similarity, python, score_model, "
        "label_model, multi), each with an optional pass_threshold"
    )
    metadata: dict[str, str] | None = None


class EvalUpdate(Strict):
    name: str | None = Field(default=None, max_length=255)
    metadata: dict[str, str] | None = None


class EvalObject(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str
    created_at: int
    metadata: dict[str, Any] | None = None
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]


class EvalList(Page):
    data: list[EvalObject]


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool = True
    eval_id: str


class EvalRunCreate(Strict):
    name: str | None = Field(default=None, max_length=255)
    data_source: dict[str, Any] = Field(
        description="{type: jsonl, source} (samples given) or {type: completions, model, input_messages, "
        "sampling_params, source} (sampled now from a model we serve); source: {type: file_content, content: "
        "[{item, sample?}]} or {type: file_id, id}"
    )
    metadata: dict[str, str] | None = None


class EvalRunObject(BaseModel):
    id: str
    object: Literal["eval.run"] = "eval.run"
    eval_id: str
    name: str
    status: str = Field(description="queued, in_progress, completed, failed or canceled")
    model: str
    data_source: dict[str, Any]
    result_counts: dict[str, int] = Field(description="total, errored, failed, passed")
    per_testing_criteria_results: list[dict[str, Any]]
    per_model_usage: list[dict[str, Any]]
    report_url: str
    error: dict[str, Any] | None = None
    created_at: int
    metadata: dict[str, Any] | None = None


class EvalRunList(Page):
    data: list[EvalRunObject]


class EvalRunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool = True
    run_id: str


class EvalOutputItemObject(BaseModel):
    id: str
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    run_id: str
    eval_id: str
    status: str = Field(description="pass or fail")
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]] = Field(description="each criterion's name, type, score and passed")
    sample: dict[str, Any]
    created_at: int


class EvalOutputItemList(Page):
    data: list[EvalOutputItemObject]
