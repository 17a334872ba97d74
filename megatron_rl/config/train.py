"""The ``train`` config section: the step schedule, the optimizer, checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from megatron_rl.algo.losses import AGGREGATIONS
from megatron_rl.checkpoint.optim_state import OPTIMIZER_FORMATS
from megatron_rl.fields import field_

LOGGERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class TrainConfig:
    """The ``train`` section: steps, batch split, routing replay, optimizer, checkpoints, logging."""
    steps: int = field_(100, ge=1, help="RL steps: one rollout batch each")
    prompts_per_step: int = field_(32, ge=1, help="prompts in a rollout batch (x rollout."
                                                 "n_samples_per_prompt responses)")
    updates_per_step: int = field_(1, ge=1, help="optimizer updates (mini-batches) per pass over "
                                                 "the rollout batch")
    epochs_per_step: int = field_(1, ge=1, help="passes over the rollout batch (PPO epochs, verl's "
                                                "ppo_epochs); each after the first reshuffles the "
                                                "mini-batches from the run's seed")
    micro_batch_size: int = field_(8, ge=1, help="responses per forward/backward (whole groups "
                                                 "for the Megatron trainer)")
    max_tokens_per_micro_batch: int = field_(
        0, ge=0, help="token-budget micro-batches (verl's use_dynamic_bsz / "
                      "ppo_max_token_len_per_gpu): whole groups fill a micro-batch up to this many "
                      "tokens as laid out (prompt + response, padding included, before CP "
                      "splits them), groups are spread over DP ranks by tokens and every rank runs "
                      "the same number of micro-batches; a group over it alone is a micro-batch "
                      "of its own; 0: micro_batch_size responses per micro-batch")
    logprob_max_tokens_per_micro_batch: int = field_(
        0, ge=0, help="the forward-only passes (old-policy and reference log-probs, the critic's "
                      "values) merge whole training micro-batches up to this many laid-out tokens "
                      "(verl's log_prob_max_token_len_per_gpu: no autograd graph, so more fit); "
                      "needs pack_sequences; 0: the training micro-batches")
    pack_sequences: bool = field_(False, help="THD packing of a micro-batch (no padding)")
    routing_replay: str = field_("off", choices=("off", "old", "rollout"),
                                 help="MoE expert routes in training: off (live), old (replay the "
                                      "old-policy pass's, R2), rollout (replay the engine's, R3)")
    lr: float = field_(1e-6, gt=0.0, help="Adam's peak learning rate")
    min_lr: float = field_(0.0, ge=0.0, help="where linear / cosine decay ends")
    lr_warmup_steps: int = field_(0, ge=0, help="in optimizer updates")
    lr_decay_style: str = field_("constant", choices=("constant", "linear", "cosine"),
                                 help="from lr to min_lr over the run's updates, after warm-up")
    weight_decay: float = field_(0.0, ge=0.0, help="decoupled (AdamW)")
    max_grad_norm: float = field_(1.0, gt=0.0, help="global gradient-norm clip")
    adam_beta2: float = field_(0.999, gt=0.0, le=1.0, help="Adam's second-moment decay")
    seed: int = field_(1234, help="model initialisation and the mini-batch shuffles")
    output_dir: str = field_("runs/default", help="checkpoints, metrics, exports; default: "
                                                  "runs/<the recipe's file name>")
    log_every: int = field_(1, ge=1, help="steps between logged metrics (console, "
                                              "TensorBoard, trackers); the last step always")
    samples_every: int = field_(10, ge=0, help="steps between writing some of the step's "
                                               "generations to samples.jsonl and TensorBoard; 0: never")
    samples_per_step: int = field_(4, ge=1, help="groups written each time (all their responses)")
    val_every: int = field_(0, ge=0, help="steps between validations on data.val_path (val/*: "
                                          "mean reward, pass@k); 0: never")
    val_n: int = field_(4, ge=1, help="responses per validation prompt (the k of pass@k)")
    val_temperature: float = field_(1.0, ge=0.0, help="sampling temperature of validation")
    val_prompts: int = field_(0, ge=0, help="validation prompts used (the first ones); 0: all")
    checkpoint_every: int = field_(0, ge=0, help="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = field_(2, ge=1, help="newest step_* directories kept")
    optimizer_checkpoint: str = field_("dp_reshardable", choices=OPTIMIZER_FORMATS,
                                       help="dp_reshardable: fast, resumes under other DP/CP sizes; "
                                            "fully_reshardable: other TP/PP sizes too")
    export_hf: bool = field_(True, help="write <output_dir>/hf (safetensors) at the end")
    resume: str = field_("true", choices=("true", "false", "force"),
                         help="true: continue from the newest checkpoint in output_dir, whose "
                              "training settings must match (train.steps and other safe knobs may "
                              "change); force: continue with changed settings; false: refuse a "
                              "directory with checkpoints")
    resume_fallback: bool = field_(False, help="if the newest checkpoint fails its manifest check, "
                                               "resume from the newest earlier one that passes")
    loggers: List[str] = field_(default_factory=lambda: ["tensorboard"], help="where metrics "
                                "go besides the console and metrics.jsonl: tensorboard "
                                "(<output_dir>/tensorboard), wandb, mlflow (megatron-rl[trackers]; "
                                "offline: WANDB_MODE=offline, MLflow's file store in "
                                "<output_dir>/mlruns unless MLFLOW_TRACKING_URI); [] for none")
    tracker_project: str = field_("megatron-rl", help="the wandb project / MLflow experiment")
    preempt_grace_s: float = field_(240.0, gt=0.0, help="after SIGTERM/SIGUSR1 or a STOP file: "
                                    "seconds to reach a checkpoint before exiting anyway (keep it "
                                    "under the launcher's warning time, e.g. --signal=B:USR1@300)")
    max_bad_steps: int = field_(3, ge=0, help="stop (with a checkpoint) after this many steps in a "
                                              "row with a non-finite loss or gradient; 0: never")

    def __post_init__(self):
        self.resume = str(self.resume).lower()   # YAML's true / false arrive as booleans


@dataclass
class CriticConfig:
    """The value model of PPO (``algo.advantage.name: gae``); unused by every other estimator."""

    init_from: str = field_("", help="'' (the policy's starting weights, a fresh head), a "
                                     "checkpoint's critic directory (step_*/critic: head too), or "
                                     "any policy checkpoint (its trunk, a fresh head)")
    head_init_std: float = field_(0.0, ge=0.0, help="std of the value head's initial weights "
                                                    "(0: values start at 0)")
    lr: float = field_(1e-5, gt=0.0, help="the critic's peak learning rate")
    min_lr: float = field_(0.0, ge=0.0, help="where linear / cosine decay ends")
    lr_warmup_steps: int = field_(0, ge=0, help="in critic updates")
    lr_decay_style: str = field_("constant", choices=("constant", "linear", "cosine"),
                                 help="from lr to min_lr over the run's updates, after warm-up")
    weight_decay: float = field_(0.0, ge=0.0, help="decoupled (AdamW)")
    max_grad_norm: float = field_(1.0, gt=0.0, help="the critic's gradient-norm clip")
    value_clip: float = field_(0.5, ge=0.0, help="PPO value clip around the rollout's values "
                                                 "(verl's cliprange_value); 0: no clip")
    loss_agg: str = field_("token-mean", choices=AGGREGATIONS, help="as the policy loss's agg")
    warmup_steps: int = field_(0, ge=0, help="first steps that train the critic only (the policy "
                                             "waits for useful values)")
