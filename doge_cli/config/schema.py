"""Typed configuration for every training stage.

Each field is documented once, here, in its attribute docstring; that text is what
``doge config show --explain`` and error messages print. All sections forbid unknown keys so a
typo is an error (with a did-you-mean), never a silently ignored setting.

A stage config (``PretrainConfig``, ``SFTConfig``, ``DPOConfig``, ``GRPOConfig``) is built by
:func:`doge_cli.config.loader.resolve_config` from, in increasing precedence: these schema
defaults < the size preset < the hardware preset < a YAML recipe < command-line overrides.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]

AttnImplementation = Literal["auto", "eager", "sdpa", "flex", "triton"]
Precision = Literal["fp32", "bf16", "fp16"]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, docs come from docstrings."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        protected_namespaces=(),
        # An infinite learning rate or a NaN weight is never meant: refuse them like any bad value.
        allow_inf_nan=False,
    )


class ModelConfig(Section):
    """The Doge architecture; field names follow transformers' ``DogeConfig``."""

    vocab_size: PositiveInt = 32768
    """Vocabulary size. Set from the tokenizer at train time when they differ (a small offline
    corpus cannot fill 32768 tokens); a mismatch with a loaded checkpoint is an error."""
    hidden_size: PositiveInt = 256
    """Width of the residual stream (d_model)."""
    intermediate_size: PositiveInt = 512
    """Hidden width of the SwiGLU MLP (d_ff)."""
    num_hidden_layers: PositiveInt = 8
    """Number of transformer blocks."""
    num_attention_heads: PositiveInt = 2
    """Number of query heads."""
    num_key_value_heads: PositiveInt = 1
    """Number of key/value heads (grouped-query attention when smaller than the query heads)."""
    max_position_embeddings: PositiveInt = 2048
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """Optional RoPE scaling as transformers names it, e.g. {rope_type: dynamic, factor: 2.0}."""
    keep_window_size: PositiveInt = 2048
    """Dynamic mask attention keeps each query's top-k keys by learned bias only when the key
    length exceeds this many tokens."""
    rms_norm_eps: float = Field(1e-6, gt=0)
    """Epsilon of every RMSNorm."""
    initializer_range: float = Field(0.02, gt=0)
    """Standard deviation of the normal init of linear and embedding weights."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head weights (the seed's small models do)."""
    is_moe: bool = False
    """Use CDMoE (SwiGLU plus product-key-routed single-neuron experts) instead of the dense MLP."""
    num_experts: PositiveInt = 16384
    """Number of CDMoE experts; must be a perfect square (product-key routing)."""
    num_experts_per_tok: PositiveInt = 64
    """Experts each token selects in CDMoE."""
    router_aux_loss_coef: float = Field(0.0, ge=0)
    """Weight of the CDMoE router load-balancing loss; 0 for dense models (a non-zero value on a
    dense model makes TRL ask for router logits that do not exist)."""

    @field_validator("rope_scaling")
    @classmethod
    def _finite_scaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, item in (value or {}).items():
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"rope_scaling.{key} must be a finite number")
        return value

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.is_moe:
            root = int(round(self.num_experts**0.5))
            if root * root != self.num_experts:
                raise ValueError(f"num_experts {self.num_experts} must be a perfect square for product-key routing")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError("num_experts_per_tok cannot exceed num_experts")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.DogeConfig``."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        fields = self.model_dump(exclude={"rope_theta", "rope_scaling"})
        fields["rope_parameters"] = rope
        return fields

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig | None:
        """This section as it describes a loaded model's ``DogeConfig`` (the inverse of ``to_hf_dict``);
        None when the config lacks a field (a legacy small-doge layout), so nothing is guessed."""
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
        fields: dict[str, Any] = {}
        for name in cls.model_fields:
            if name in ("rope_theta", "rope_scaling"):
                continue
            if not hasattr(hf_config, name):
                return None
            fields[name] = getattr(hf_config, name)
        if theta is None:
            return None
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        fields["rope_theta"] = theta
        fields["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        return cls(**fields)


class DataConfig(Section):
    """Where training data comes from and how batches are shaped."""

    path: str = "./datasets/merged/pt"
    """Dataset folder written by ``doge data merge`` (a DatasetDict with train and test splits)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id saved with the final model; defaults to the one recorded with
    the dataset, or the start model's."""
    max_length: PositiveInt = 2048
    """Tokens per training sequence."""
    eval_split: str = "test"
    """Split used for periodic evaluation; missing split means no evaluation."""


class OptimConfig(Section):
    """The optimizer: AdamW, or Muon for the blocks' hidden matrices with AdamW for everything else
    (``doge_cli/train/optim.py`` lists which tensor gets which). Weight decay applies to matrices only:
    never to norms, biases, residual weights or ``A``. Both parts follow ``schedule`` and are clipped
    together by max_grad_norm."""

    name: Literal["adamw", "muon"] = "adamw"
    """adamw; or muon: torch.optim.Muon (orthogonalised Nesterov momentum) on the attention and MLP
    matrices at muon_lr, AdamW at lr on the embeddings, head, norms, dynamic-mask parameters, router and
    expert tables. Muon works on one process and under DDP; DeepSpeed and FSDP are refused."""
    lr: float = Field(8e-3, gt=0)
    """Peak learning rate (of AdamW's tensors, with optim.name muon)."""
    muon_lr: float = Field(0.02, gt=0)
    """optim.name muon: peak learning rate of the Muon matrices (scaled per matrix by muon_adjust_lr)."""
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    """optim.name muon: Muon's momentum."""
    muon_nesterov: bool = True
    """optim.name muon: Nesterov momentum."""
    muon_ns_steps: int = Field(5, ge=1, le=20)
    """optim.name muon: Newton-Schulz iterations per orthogonalisation."""
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    """optim.name muon: per-matrix rate scaling. original: × sqrt(max(1, rows/cols)) (Keller Jordan's
    Muon); match_rms_adamw: × 0.2·sqrt(max(rows, cols)), which gives updates of AdamW's size so that
    muon_lr can be an AdamW learning rate (Moonlight)."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay for weight matrices."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool | None = None
    """Use torch's fused AdamW; None picks it where the device supports it."""


class ScheduleConfig(Section):
    """Learning-rate schedule over the optimizer steps."""

    name: Literal["warmup_stable_decay", "cosine_with_min_lr", "constant_with_warmup"] = "warmup_stable_decay"
    """warmup_stable_decay: linear warmup, constant, then decay (lets pretraining continue on new
    data); cosine_with_min_lr: linear warmup then cosine down to min_lr_rate × lr."""
    warmup_ratio: Ratio = 0.1
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    decay_ratio: Ratio = 0.1
    """warmup_stable_decay only: fraction of the steps spent decaying at the end."""
    min_lr_rate: Ratio = 0.0
    """Final learning rate as a fraction of the peak."""

    @model_validator(mode="after")
    def _check_ratios(self) -> ScheduleConfig:
        if self.name == "warmup_stable_decay" and self.warmup_ratio + self.decay_ratio > 1.0:
            raise ValueError("warmup_ratio + decay_ratio must not exceed 1")
        return self


class TrainConfig(Section):
    """How long to train and how many sequences make one optimizer step."""

    max_steps: PositiveInt | None = 8000
    """Optimizer steps to run. None: derive from num_epochs and the dataset size."""
    num_epochs: float | None = Field(None, gt=0)
    """Epochs over the training split, used when max_steps is None."""
    global_batch_size: PositiveInt = 256
    """Sequences per optimizer step across all processes (micro batch × accumulation ×
    processes). The hardware preset picks the micro batch; accumulation is derived from this."""
    seed: int = 233
    """Seed for initialisation, data order and sampling."""
    moe_warmup_steps: NonNegInt = 0
    """For a CDMoE model made by doge upcycle: during the first this many optimizer steps only the router
    and expert embeddings train (every other tensor stays exactly as it is, and the optimizer keeps no
    state for it), then every tensor trains, in the same run."""

    @model_validator(mode="after")
    def _check_length(self) -> TrainConfig:
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("set train.max_steps or train.num_epochs")
        return self


class RuntimeConfig(Section):
    """Machine-dependent settings; a hardware preset fills them."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device for single-process runs; accelerate decides under a launcher."""
    precision: Precision = "fp32"
    """Compute precision: bf16 autocast where supported, fp32 otherwise; weights stay fp32."""
    attn_implementation: AttnImplementation = "auto"
    """Attention backend: eager (reference), sdpa, flex, triton (fused kernel), or auto (the
    fastest correct one for the device)."""
    micro_batch_size: PositiveInt = 1
    """Sequences per forward/backward pass on each process."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dataloader_workers: NonNegInt = 0
    """Background data-loader processes per training process."""
    dist_timeout: PositiveInt = 1800
    """Seconds a process of a distributed run waits for the others at any collective step (and at start-up)
    before it gives up: a killed process is noticed at once, a hung one after this long, and the run then
    stops on every machine (continue with --resume auto). Raise it when a checkpoint of a large model on
    slow storage takes longer, since the other processes wait for it at a barrier."""


class LoggingConfig(Section):
    """What is logged, where and how often."""

    log_every: PositiveInt = 10
    """Log metrics every this many optimizer steps (the only steps that synchronise with the device)."""
    eval_every: NonNegInt = 500
    """Evaluate on the eval split every this many steps; 0 only at the end."""
    eval_batches: PositiveInt = 20
    """Micro-batches per evaluation."""
    tensorboard: bool = False
    """Also write TensorBoard event files under RUN/tensorboard (the same as tensorboard in report_to)."""
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = []
    """Trackers besides metrics.jsonl: tensorboard (RUN/tensorboard), wandb (the doge-cli[track] extra; its
    project is logging.project, WANDB_MODE=offline logs under RUN/wandb). From the main process only; a
    --resume continues the same wandb run without repeating its steps."""
    project: str = "doge"
    """The wandb project runs are logged to."""
    sample_every: NonNegInt = 0
    """Generate a short sample from sample_prompt every this many steps; 0 never."""
    sample_prompt: str = "Once upon a time"
    """Prompt for the periodic samples."""
    eval_tasks: list[str] = []
    """Downstream tasks to run while training, named as ``doge eval --tasks`` names them: the builtin offline
    tasks (heldout-ppl, chatterbot-mc, arithmetic), the stage tasks (sft-loss, chat-mc, preference,
    math-reward), a group (builtin, stages) or a hub task (needs the network). They run in-process on the model
    being trained (on the main process; on every process under ZeRO-3 and FSDP, whose forwards are
    collective), every eval_tasks_every steps and at the last step, on the first eval_tasks_max_samples
    examples of each task, in batches of runtime.micro_batch_size; chat stages (sft, dpo, grpo) ask in the
    chat template (as doge eval --chat-template), pretraining does not. Each figure goes to metrics.jsonl and
    the trackers as eval/<task>/<metric> (the metric names of doge eval's results, without their standard
    errors), the seconds taken as eval_tasks_s (left out of tokens/s and MFU); doge report draws them. Unknown
    names are refused when the config is read, missing data before training starts. Empty: none."""
    eval_tasks_every: NonNegInt = 500
    """Run eval_tasks every this many optimizer steps, and always at the last step; 0: only at the last step."""
    eval_tasks_max_samples: PositiveInt = 50
    """Examples per task at each run of eval_tasks (the first ones of each held-out set, the same every time, as
    doge eval --max-samples). At 50 the builtin tasks take about 1.5 s a time in the quickstart pretraining run on a
    2-core CPU, under 10% of its time even every 100 steps (its eval_every); lighteval's import adds about 5 s
    once, before training starts."""
    eval_tasks_datasets_dir: str = "./datasets"
    """Folder whose eval/ (builtin tasks) and merged/ (stage tasks) hold the held-out sets eval_tasks read, as
    doge eval --datasets-dir (written by doge data download --recipe quickstart and doge data merge)."""

    @field_validator("eval_tasks", mode="before")
    @classmethod
    def _one_task_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # eval_tasks=builtin or eval_tasks=a,b

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        from doge_cli.errors import DogeError
        from doge_cli.eval.tasks import expand_task_names

        if value:
            try:
                names = expand_task_names(value)
            except DogeError as err:
                raise ValueError(str(err)) from None
            if not names:
                raise ValueError("names no task; give task names or groups, or [] for none")
        return value


class CheckpointConfig(Section):
    """Periodic checkpoints under RUN/checkpoints/step-NNNNNN/ and the final export."""

    every: NonNegInt = 500
    """Save a checkpoint every this many optimizer steps; 0 only the final model."""
    keep_last: PositiveInt = 3
    """Keep this many newest checkpoints; older ones are deleted after a new one is complete."""


class HubConfig(Section):
    """Uploading the model to the Hugging Face hub as the run goes (what ``doge push`` does by hand)."""

    push: bool = False
    """Push the model to hub.repo: needs hub access and a token (checked before training starts). A failed
    upload is reported and the run goes on; it never stops or changes the run."""
    repo: str | None = None
    """OWNER/NAME of the repo (created when missing)."""
    private: bool = False
    """Create the repo private."""
    strategy: Literal["end", "every_save"] = "end"
    """end: the final model with its model card when the run ends; every_save: also the model at every
    checkpoint (one commit each)."""

    @model_validator(mode="after")
    def _repo_when_pushing(self):
        if self.push and not self.repo:
            raise ValueError("hub.push is true but hub.repo is not set; set hub.repo=OWNER/NAME")
        return self


class StageConfig(Section):
    """Sections every stage shares."""

    size: str | None = None
    """Size preset the run was resolved with (informational once resolved)."""
    hardware: str = "auto"
    """Hardware preset the run was resolved with (informational once resolved)."""
    output_dir: str = "./runs/pt"
    """Run folder: checkpoints, metrics.jsonl, resolved config, final/ model."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model architecture (ignored when starting from an existing model)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training data."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Length of training and batch size."""
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    """Device, precision, kernels."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metrics and samples."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints."""
    hub: HubConfig = Field(default_factory=HubConfig)
    """Pushing the model to the Hugging Face hub."""


class PretrainConfig(StageConfig):
    """Pretraining (Doge-Base): next-token prediction on packed text."""

    stage: Literal["pt"] = "pt"
    """Training stage."""
    init_from: str | None = None
    """Continue pretraining from this model folder or hub id instead of a fresh init."""


class SFTConfig(StageConfig):
    """Supervised fine-tuning (Doge-Instruct, and the R1 distillation stage): loss on assistant
    tokens of chat conversations."""

    stage: Literal["sft"] = "sft"
    """Training stage."""
    init_from: str | None = None
    """Model folder or hub id to fine-tune (required)."""
    assistant_only_loss: bool = True
    """Compute the loss on assistant tokens only."""
    packing: bool = True
    """Pack several conversations per row (attention never crosses conversations)."""


class DPOSection(Section):
    """Direct preference optimisation (Rafailov et al., 2023)."""

    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL penalty to the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid: DPO eq. 7; ipo: Azar et al. 2023 eq. 17; hinge: SLiC (Zhao et al. 2023)."""
    label_smoothing: Ratio = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped (sigmoid only)."""
    reference: Literal["model", "precomputed"] = "precomputed"
    """model: keep a frozen copy of the start model; precomputed: compute its log-probabilities
    once before training and store them (half the memory)."""
    max_length: PositiveInt = 1024
    """Longest prompt + completion; longer pairs are truncated (completion end first)."""
    max_prompt_length: PositiveInt = 512
    """Longest prompt; longer prompts keep their last tokens."""

    @model_validator(mode="after")
    def _check_lengths(self) -> DPOSection:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length {self.max_prompt_length} must be below max_length "
                             f"{self.max_length}, or no reply token would be left")
        return self


class DPOConfig(StageConfig):
    """Preference optimisation of an SFT model."""

    stage: Literal["dpo"] = "dpo"
    """Training stage."""
    init_from: str | None = None
    """SFT model folder or hub id to align (required)."""
    dpo: DPOSection = Field(default_factory=DPOSection)
    """DPO loss settings."""


class RewardSpec(Section):
    """One reward function and its weight."""

    name: str
    """A builtin reward (accuracy, format, length, repetition) or a dotted import path
    ``package.module:function`` of a user function."""
    weight: float = 1.0
    """Weight of this reward in the total."""


class GRPOSection(Section):
    """Group relative policy optimisation (Shao et al., 2024, DeepSeekMath eq. 3).

    ``train.global_batch_size`` and ``runtime.micro_batch_size`` count prompts; each step trains on
    global_batch_size x num_generations completions."""

    num_generations: Annotated[int, Field(ge=2)] = 8
    """Completions sampled per prompt (the group)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts."""
    max_prompt_length: PositiveInt = 512
    """Longest prompt in tokens (after the chat template); longer prompts keep their last tokens, as
    in TRL (the start of the system prompt goes first), and the run says once how many are cut."""
    max_completion_length: PositiveInt = 1024
    """New tokens per completion."""
    epsilon: float = Field(0.2, gt=0)
    """Clipping range of the policy ratio."""
    epsilon_high: float | None = None
    """Upper clipping range (DAPO's clip-higher); None uses epsilon."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference model; 0 needs no reference model."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """Token normalisation: grpo: per sequence then mean; dr_grpo: by max completion length;
    dapo: by all completion tokens in the batch."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward standard deviation (Dr. GRPO turns this off)."""
    num_iterations: PositiveInt = 1
    """Optimisation passes over each batch of rollouts."""
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=1.0)]
    )
    """Reward functions and their weights."""


class GRPOConfig(StageConfig):
    """Reinforcement learning with verifiable rewards (Doge-R1)."""

    stage: Literal["grpo"] = "grpo"
    """Training stage."""
    init_from: str | None = None
    """Model folder or hub id to train (required)."""
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    """GRPO settings."""


STAGES: dict[str, type[StageConfig]] = {
    "pt": PretrainConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "grpo": GRPOConfig,
}
TRAINING_STAGES = tuple(STAGES)
"""The stages ``doge train`` runs, in pipeline order (``doge_cli.data.schema.DATA_STAGES`` adds r1)."""
