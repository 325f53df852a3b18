"""CausalDPO: softmax DPO with environment inference, a backdoor adjustment and an invariance penalty.

From "Causal Direct Preference Optimization for Distributionally Robust Generative Recommendation" (arXiv
2603.22335). A latent environment E (an exposure regime, a time period) drives both the history X and the
preference Y; plain DPO learns E-driven shortcuts such as popularity. CausalDPO targets p(Y | do(X)):

1. **Environments.** z_i = g(h_i), with h_i the policy's last hidden state at the last prompt token and g a
   linear map; K centres c_k; memberships p_ik = softmax_k(−‖z_i − c_k‖² / τ). g and the centres form the
   `EnvironmentHead`, registered on the model (so it moves, casts and saves with it) and saved beside the adapter as
   `environment_head.safetensors` + `environment_head.json`. In the `known` mode p_ik is the one-hot label of a
   dataset column instead.
2. **Backdoor adjustment.** Per-row losses ℓ_i (softmax DPO), environment risks R_k = Σ_i p_ik ℓ_i / Σ_i p_ik, and
   L_BA = Σ_k P(k) R_k. P(k) is `uniform` or `marginal`: the mean membership over the training set — estimated by
   the initialisation pass, then a running mean over every training row seen — never the batch mean, with which
   L_BA would collapse to the plain mean of ℓ_i.
3. **Invariance.** λ · the mean over environment pairs of a weighted MMD² (RBF kernel, median-heuristic or fixed
   bandwidth) between the membership-weighted distributions of a per-row statistic: the preference logit
   −log Σ_j exp(r_j − r_w) (β-scaled reward margin; the margin itself for J = 1) or the state z; or `vrex`, the
   variance of R_k across environments.

L = L_BA + λ · L_inv. With K = 1 and λ = 0 this is `SoftmaxDPOTrainer` exactly (tests/test_alignment.py).

**How the environments are learnt (our choice; the paper says "jointly" and the authors' release never trained
them).** Environments are inferred from the representation, never chosen by the loss: the memberships enter L_BA and
L_inv detached, and g and the centres are fitted by a clustering objective instead of by the gradient of L. Trained by
L, they collapse: with the uniform prior ∂L_BA/∂p_ik = (ℓ_i − R_k) / (K m_k), so the optimum moves the lowest-loss
rows into a tiny environment whose risk then carries 1/K of the loss, whatever the true environments are, and the
MMD term, minimised over memberships, pushes them towards uninformative (our first version did this: one cluster
held 97-99% of the rows on ml-100k; tests/test_alignment.py reproduces the setting and checks it no longer happens).
So: g is fixed at initialisation to the top `environment_dim` principal directions of the policy's states on a
sample of training prompts, scaled so that E‖z‖² = 1 (the directions along which prompts differ most, on a scale the
temperature τ is meant for); the centres start from k-means++ and Lloyd steps on that sample, and every
`environment_refit_steps` optimizer steps they are refitted by Lloyd steps (k-means, warm-started, so environment k
stays environment k) on the last `environment_init_samples` training states, following the policy as it moves. The
policy still gets the gradient of L_BA through the per-row losses, and of the `state` MMD through z.

Other choices where the paper is silent: an environment with no membership mass in a batch (Σ_i p_ik < 1e-6) is
left out of that batch's L_BA and L_inv and the prior is renormalised over the others; the median heuristic sets
σ² to the median pairwise squared distance of the batch's statistics (detached); in the `known` mode with the
`state` statistic, h stands in for z. Under several processes g, the centres and the pool of states follow the first
process's (DDP broadcasts module buffers from it); the running marginal is each process's own. Every logging
step reports each environment's mass and, when the rows carry their true environment (a synthetic world's column),
the NMI of the argmax memberships with it over the last rows seen.
We do not reproduce the release's defects listed in the method file (token-id averaging, untrained clustering
parameters, first-token states under left padding, an ignored β).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.trainer_utils import get_last_checkpoint

from llmrec.data import PreferenceDataConfig
from llmrec.errors import LLMRecError

from . import StageSpec
from .preference_stage import reference_model_kwargs
from .softmax_dpo import PolicyOutput, SoftmaxDPOConfig, SoftmaxDPOTrainer, build_datasets

HEAD_WEIGHTS = "environment_head.safetensors"
HEAD_CONFIG = "environment_head.json"


@dataclass
class CausalDPOConfig(SoftmaxDPOConfig):
    r"""
    Configuration of [`CausalDPOTrainer`]: every field of [`SoftmaxDPOConfig`] (so of `trl.DPOConfig`), plus:

        > Parameters that control the environments

        num_environments (`int`, *optional*, defaults to `2`):
            K, the number of environments (at least 1). With K = 1 and `invariance_weight=0.0` this is
            [`SoftmaxDPOTrainer`] exactly.
        environment_mode (`str`, *optional*, defaults to `"inferred"`):
            Where memberships come from: `"inferred"` (soft clustering of the policy's prompt states,
            p_ik = softmax_k(−‖z_i − c_k‖² / τ)) or `"known"` (one-hot memberships from `environment_column`).
        environment_column (`str`, *optional*, defaults to `"environment"`):
            The dataset column of the `"known"` mode.
        environment_dim (`int`, *optional*, defaults to `16`):
            Dimension of z = g(h), h the policy's last hidden state at the last prompt token.
        environment_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature τ of the soft memberships (positive).
        environment_init_samples (`int`, *optional*, defaults to `512`):
            Training prompts whose states fix g and start the centres (k-means++, then Lloyd steps); also the number
            of recent training states the centres are refitted on.
        environment_refit_steps (`int`, *optional*, defaults to `50`):
            Refit the centres by Lloyd steps on the recent training states every this many optimizer steps (0: never,
            the centres stay where the initialisation put them).

        > Parameters that control the loss

        backdoor_prior (`str`, *optional*, defaults to `"uniform"`):
            The environment prior P(k) of the backdoor adjustment L_BA = Σ_k P(k) R_k: `"uniform"` or `"marginal"`
            (the mean membership over the training set).
        invariance (`str`, *optional*, defaults to `"mmd"`):
            The invariance penalty: `"mmd"` (the mean over environment pairs of a weighted MMD² between the
            membership-weighted distributions of `invariance_statistic`), `"vrex"` (the variance of the environment
            risks R_k) or `"none"`.
        invariance_weight (`float`, *optional*, defaults to `0.001`):
            λ, the weight of the invariance penalty (non-negative): L = L_BA + λ · L_inv.
        invariance_statistic (`str`, *optional*, defaults to `"margin"`):
            What the MMD compares: `"margin"` (the preference logit −log Σ_j exp(r_j − r_w)) or `"state"` (z; h in
            the `"known"` mode).
        mmd_bandwidth (`float`, *optional*):
            Fixed RBF σ (positive); `None` (default) uses the median heuristic.
    """

    num_environments: int = field(default=2, metadata={"help": "K, the number of environments."})
    environment_mode: str = field(
        default="inferred", metadata={"help": "Where memberships come from.", "choices": ["inferred", "known"]}
    )
    environment_column: str = field(default="environment", metadata={"help": "The dataset column of the known mode."})
    environment_dim: int = field(default=16, metadata={"help": "Dimension of z = g(h)."})
    environment_temperature: float = field(default=1.0, metadata={"help": "Temperature τ of the soft memberships."})
    environment_init_samples: int = field(
        default=512, metadata={"help": "Training prompts that fix g and start the centres; states kept for refits."}
    )
    environment_refit_steps: int = field(
        default=50, metadata={"help": "Refit the centres on recent training states every this many steps (0: never)."}
    )
    backdoor_prior: str = field(
        default="uniform", metadata={"help": "The environment prior P(k).", "choices": ["uniform", "marginal"]}
    )
    invariance: str = field(
        default="mmd", metadata={"help": "The invariance penalty.", "choices": ["mmd", "vrex", "none"]}
    )
    invariance_weight: float = field(default=0.001, metadata={"help": "λ, the weight of the invariance penalty."})
    invariance_statistic: str = field(
        default="margin", metadata={"help": "What the MMD compares.", "choices": ["margin", "state"]}
    )
    mmd_bandwidth: float | None = field(default=None, metadata={"help": "Fixed RBF σ; None: the median heuristic."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("environment_mode", "backdoor_prior", "invariance", "invariance_statistic"):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.num_environments < 1:
            raise ValueError("num_environments must be at least 1")
        if self.environment_temperature <= 0 or self.invariance_weight < 0:
            raise ValueError("environment_temperature must be positive and invariance_weight non-negative")
        if self.mmd_bandwidth is not None and self.mmd_bandwidth <= 0:
            raise ValueError("mmd_bandwidth must be positive")
        if self.environment_refit_steps < 0 or self.environment_init_samples < self.num_environments:
            raise ValueError("environment_refit_steps must be >= 0 and environment_init_samples >= num_environments")


class EnvironmentHead(nn.Module):
    """g and the centres: memberships p_ik = softmax_k(−‖g(h_i) − c_k‖² / τ), fitted by clustering, not by the loss.

    Everything it holds is a buffer (no gradient; DDP keeps the processes' copies equal): g's weight and bias, the
    centres, and a ring of the latest embedded training states that `refit` clusters. The running marginal of p_ik
    is kept in float64 outside the module's tensors, so that casting the module (bf16 under DeepSpeed) cannot round
    its counts; it is saved in environment_head.json.
    """

    def __init__(self, hidden_size: int, dim: int, num_environments: int, temperature: float, pool_size: int = 512):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "dim": dim, "num_environments": num_environments,
                       "temperature": temperature, "pool_size": pool_size}
        self.register_buffer("weight", torch.zeros(dim, hidden_size))
        self.register_buffer("bias", torch.zeros(dim))
        self.register_buffer("centres", torch.zeros(num_environments, dim))
        self.register_buffer("pool", torch.zeros(pool_size, dim))
        self.pool_seen = 0
        self.membership_sum = torch.zeros(num_environments, dtype=torch.float64)
        self.membership_count = 0

    def embed(self, states: torch.Tensor) -> torch.Tensor:
        return states.to(self.weight.dtype) @ self.weight.T + self.bias

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Memberships [rows, K]. A forward (not a plain method), so ZeRO-3 gathers what it needs."""
        squared = ((self.embed(states).unsqueeze(1) - self.centres.unsqueeze(0)) ** 2).sum(-1)
        return torch.softmax(-squared / self.config["temperature"], dim=-1)

    @torch.no_grad()
    def fit(self, states: torch.Tensor, generator: torch.Generator) -> None:
        """g := the top principal directions of `states`, scaled to E‖z‖² = 1; centres := k-means++ and Lloyd."""
        points = states.double().cpu()
        mean = points.mean(dim=0)
        _, _, directions = torch.linalg.svd(points - mean, full_matrices=False)
        weight = torch.zeros(self.config["dim"], points.shape[1], dtype=torch.float64)
        top = directions[: self.config["dim"]]
        weight[: len(top)] = top
        scale = ((points - mean) @ weight.T).pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
        self.weight.copy_(weight / scale)
        self.bias.copy_(-(weight @ mean) / scale)
        embedded = self.embed(states.to(self.weight)).float().cpu()
        self.centres.copy_(kmeans_plus_plus(embedded, self.config["num_environments"], generator))
        self.remember(embedded)

    @torch.no_grad()
    def remember(self, embedded: torch.Tensor) -> None:
        """Keep `embedded` states in the ring the centres are refitted on."""
        for row in embedded.detach().to(self.pool):
            self.pool[self.pool_seen % len(self.pool)] = row
            self.pool_seen += 1

    @torch.no_grad()
    def refit(self, steps: int = 10) -> None:
        """Lloyd steps on the remembered states, from the current centres (so each environment keeps its index)."""
        points = self.pool[: min(self.pool_seen, len(self.pool))].float()
        self.centres.copy_(lloyd(points, self.centres.float(), steps).to(self.centres))

    @torch.no_grad()
    def observe(self, memberships: torch.Tensor) -> None:
        self.membership_sum += memberships.detach().double().sum(0).cpu()
        self.membership_count += memberships.shape[0]

    def marginal(self) -> torch.Tensor:
        return self.membership_sum / max(self.membership_count, 1)

    def save(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        folder = Path(folder)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in (state or self.state_dict()).items()}
        save_file(tensors, folder / HEAD_WEIGHTS)
        running = {"membership_sum": self.membership_sum.tolist(), "membership_count": self.membership_count,
                   "pool_seen": self.pool_seen}
        (folder / HEAD_CONFIG).write_text(json.dumps({**self.config, **running}, indent=2) + "\n")

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        weights = load_file(folder / HEAD_WEIGHTS)
        self.load_state_dict({k: v.to(self.centres.dtype) for k, v in weights.items()})
        saved = json.loads((folder / HEAD_CONFIG).read_text())
        self.membership_sum = torch.tensor(saved["membership_sum"], dtype=torch.float64)
        self.membership_count = saved["membership_count"]
        self.pool_seen = saved["pool_seen"]

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> EnvironmentHead:
        saved = json.loads((Path(folder) / HEAD_CONFIG).read_text())
        head = cls(**{key: saved[key] for key in ("hidden_size", "dim", "num_environments", "temperature",
                                                  "pool_size")})
        head.load(folder)
        return head


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator, steps: int = 10) -> torch.Tensor:
    """k-means++ seeding, then `steps` Lloyd iterations; returns the k centres."""
    first = torch.randint(len(points), (1,), generator=generator).item()
    centres = [points[first]]
    for _ in range(1, k):
        distances = torch.cdist(points, torch.stack(centres)).min(dim=1).values ** 2
        total = distances.sum()
        if total <= 0:  # every point coincides with a centre: any point will do
            choice = torch.randint(len(points), (1,), generator=generator).item()
        else:
            choice = torch.multinomial(distances / total, 1, generator=generator).item()
        centres.append(points[choice])
    return lloyd(points, torch.stack(centres), steps)


def lloyd(points: torch.Tensor, centres: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` k-means (Lloyd) iterations from `centres`; a centre that loses every point stays where it was."""
    centres = centres.clone()
    for _ in range(steps):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        for c in range(len(centres)):
            members = points[assignment == c]
            if len(members):
                centres[c] = members.mean(dim=0)
    return centres


def weighted_mmd2(statistics: torch.Tensor, weights_a: torch.Tensor, weights_b: torch.Tensor, bandwidth: float | None):
    """MMD² between two weightings of the same samples under an RBF kernel: (a − b)ᵀ K (a − b)."""
    if statistics.dim() == 1:
        statistics = statistics.unsqueeze(-1)
    # not cdist: its sqrt has no gradient at 0
    squared = ((statistics.unsqueeze(1) - statistics.unsqueeze(0)) ** 2).sum(-1)
    if bandwidth is None:
        off_diagonal = squared[~torch.eye(len(squared), dtype=torch.bool, device=squared.device)]
        sigma2 = off_diagonal.median().detach().clamp_min(1e-6) if off_diagonal.numel() else squared.new_tensor(1.0)
    else:
        sigma2 = squared.new_tensor(bandwidth**2)
    kernel = torch.exp(-squared / (2 * sigma2))
    a = weights_a / weights_a.sum()
    b = weights_b / weights_b.sum()
    difference = a - b
    return difference @ kernel @ difference


def environment_loss(per_row_loss: torch.Tensor, memberships: torch.Tensor, prior: torch.Tensor, invariance: str,
                     invariance_weight: float, statistic: torch.Tensor, bandwidth: float | None):
    """CausalDPO's objective for one batch: L = Σ_k P(k) R_k + λ L_inv, with R_k = Σ_i p_ik ℓ_i / Σ_i p_ik.

    `memberships` [rows, K] are taken as given (detached: the environments are not the loss's to choose); `prior`
    is P(k) before renormalising over the environments present in the batch. Returns (L, L_BA, L_inv, R, the
    environments' masses, which environments are present).
    """
    memberships = memberships.detach()
    mass = memberships.sum(dim=0)
    present = mass > 1e-6
    risks = (memberships * per_row_loss.unsqueeze(1)).sum(dim=0) / mass.clamp_min(1e-6)
    weights = prior * present
    backdoor = (weights / weights.sum() * risks).sum()
    penalty = torch.zeros((), device=per_row_loss.device, dtype=per_row_loss.dtype)
    environments = present.nonzero().flatten().tolist()
    if invariance_weight > 0 and invariance != "none" and len(environments) > 1:
        if invariance == "vrex":
            penalty = risks[environments].var(unbiased=False)
        else:
            pairs = [(a, b) for i, a in enumerate(environments) for b in environments[i + 1:]]
            penalty = torch.stack([weighted_mmd2(statistic.float(), memberships[:, a].float(),
                                                 memberships[:, b].float(), bandwidth) for a, b in pairs]).mean()
    return backdoor + invariance_weight * penalty, backdoor, penalty, risks, mass, present


@dataclass
class CausalPolicyOutput(PolicyOutput):
    prompt_states: torch.Tensor | None = None


class CausalDPOTrainer(SoftmaxDPOTrainer):
    """[`SoftmaxDPOTrainer`] with CausalDPO's environments, backdoor adjustment and invariance penalty."""

    _tag_names = ["trl", "dpo", "causal-dpo", "llmrec"]

    def __init__(self, model, *args, **kwargs):
        config: CausalDPOConfig = kwargs["args"]
        train_dataset = kwargs["train_dataset"]
        self.known = config.environment_mode == "known"
        if config.environment_column in train_dataset.column_names:  # memberships (known) or the NMI (inferred)
            self._extra_columns = (config.environment_column,)
        if self.known:
            if config.environment_column not in train_dataset.column_names:
                raise LLMRecError(
                    f"environment_mode is 'known' but the training rows have no {config.environment_column!r} column "
                    f"(columns: {', '.join(train_dataset.column_names)}).",
                    "stages.args.environment_column",
                )
        elif len(train_dataset) < config.num_environments:
            raise LLMRecError(
                f"num_environments is {config.num_environments} but there are only {len(train_dataset)} training "
                "prompts to cluster.",
                "stages.args.num_environments",
            )
        super().__init__(model, *args, **kwargs)
        # Attached after TRL has added its "ref" adapter copy, so no LoRA layer lands in g. The head holds buffers
        # only (nothing for the optimizer), in float32 whatever the policy's dtype.
        head = EnvironmentHead(
            model.config.get_text_config().hidden_size,
            config.environment_dim,
            config.num_environments,
            config.environment_temperature,
            config.environment_init_samples,
        ).to(device=self.args.device)
        model.environment_head = head
        self.environment_head = head
        self._backbone = _backbone(self.model)
        self._refitted_at = 0
        self._assignments: dict[str, list[tuple[int, int]]] = {"train": [], "eval": []}
        self._initialise_environments()

    # --- environments ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _initialise_environments(self) -> None:
        head, K = self.environment_head, self.args.num_environments
        if self.known:
            labels = torch.tensor(self.train_dataset[self.args.environment_column])
            if labels.min() < 0 or labels.max() >= K:
                raise LLMRecError(
                    f"environment labels range over {labels.min().item()}..{labels.max().item()} but num_environments "
                    f"is {K}; labels must be 0..K-1.",
                    "stages.args.num_environments",
                )
            head.observe(F.one_hot(labels, K))
            return
        generator = torch.Generator().manual_seed(self.args.seed)
        count = min(self.args.environment_init_samples, len(self.train_dataset))
        rows = torch.randperm(len(self.train_dataset), generator=generator)[:count].tolist()
        prompts = self.train_dataset.select(rows)["prompt_ids"]
        states = self._prompt_states_of(prompts)
        head.fit(states, generator)
        head.observe(head(states))

    def _prompt_states_of(self, prompts: list[list[int]]) -> torch.Tensor:
        """The policy's last hidden state at the last token of each prompt (no gradient)."""
        model = self.model
        device = self.accelerator.device
        batch_size = self.args.per_device_train_batch_size * 4
        states = []
        was_training = model.training
        model.eval()
        for start in tqdm(range(0, len(prompts), batch_size), desc="Initialising environments",
                          disable=not self.is_world_process_zero()):
            batch = prompts[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), self._tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):
                ids[row, : len(prompt)] = torch.tensor(prompt)
                mask[row, : len(prompt)] = 1
            hidden = self._backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            last = mask.sum(dim=1).to(device) - 1
            states.append(hidden[torch.arange(len(batch), device=device), last])
        model.train(was_training)
        return torch.cat(states)

    def _policy_logps(self, model, model_kwargs, labels, seq_len) -> CausalPolicyOutput:
        captured: list[torch.Tensor] = []
        handle = self._backbone.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            policy = super()._policy_logps(model, model_kwargs, labels, seq_len)
        finally:
            handle.remove()
        last_prompt = (labels != -100).int().argmax(dim=1) - 1  # right padding: the completion follows the prompt
        states = captured[0][torch.arange(labels.shape[0], device=labels.device), last_prompt]
        return CausalPolicyOutput(policy.logps, policy.outputs, states)

    # --- loss ----------------------------------------------------------------------------------------------

    def combine_row_losses(self, per_row_loss, preference_logits, inputs, policy: CausalPolicyOutput, mode: str):
        rows = per_row_loss.shape[0]
        head, K = self.environment_head, self.args.num_environments
        states = policy.prompt_states[:rows]
        column = self.args.environment_column
        if self.known:
            memberships = F.one_hot(inputs[column].long(), K).to(per_row_loss.dtype)
        else:
            memberships = head(states.detach()).to(per_row_loss.dtype)
            if mode == "train":
                head.remember(head.embed(states.detach()))
                self._refit_when_due()
        prior = torch.ones(K) if self.args.backdoor_prior == "uniform" else head.marginal()
        if self.args.invariance_statistic == "margin":
            statistic = preference_logits
        else:
            statistic = states if self.known else head.embed(states)
        loss, backdoor, penalty, risks, mass, present = environment_loss(
            per_row_loss, memberships, prior.to(per_row_loss), self.args.invariance, self.args.invariance_weight,
            statistic, self.args.mmd_bandwidth,
        )
        if mode == "train" and not self.known:
            head.observe(memberships)

        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["loss/backdoor"].append(gather(backdoor.detach()).mean().item())
        self._metrics[mode]["loss/invariance"].append(gather(penalty.detach()).mean().item())
        shares = gather(mass.detach().unsqueeze(0)).sum(0)
        for k in range(K):
            self._metrics[mode][f"environment/{k}/mass"].append((shares[k] / shares.sum()).item())
            if present[k]:
                self._metrics[mode][f"environment/{k}/risk"].append(risks[k].item())
        if column in inputs and not self.known:
            self._metrics[mode]["environment/nmi"].append(self._recent_nmi(mode, memberships, inputs[column]))
        return loss

    def _refit_when_due(self) -> None:
        """Refit the centres on the recent training states every `environment_refit_steps` optimizer steps."""
        every, step = self.args.environment_refit_steps, self.state.global_step
        if every and step and step % every == 0 and step != self._refitted_at:
            self.environment_head.refit()
            self._refitted_at = step

    def _recent_nmi(self, mode: str, memberships: torch.Tensor, labels: torch.Tensor) -> float:
        """NMI of the argmax memberships with the true environments over the last `environment_init_samples` rows."""
        from llmrec.eval.metrics import normalised_mutual_information

        recent = self._assignments[mode]
        recent += zip(memberships.argmax(dim=1).tolist(), labels.tolist())
        del recent[: -self.args.environment_init_samples]
        return normalised_mutual_information([a for a, _ in recent], [b for _, b in recent])

    # --- saving ----------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None):
        # The head goes to its own file; the model's file keeps the model's keys only (a fully fine-tuned model would
        # otherwise carry keys its class does not know). Under ZeRO-3 or FSDP `state_dict` is the gathered one.
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        head = {k.split("environment_head.", 1)[1]: v for k, v in state_dict.items() if "environment_head." in k}
        super()._save(output_dir, state_dict={k: v for k, v in state_dict.items() if "environment_head." not in k})
        self.environment_head.save(output_dir or self.args.output_dir, head or None)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # Restore the head before transformers restores the rest: its own loader (and DeepSpeed's) knows only the
        # adapter and the optimizer, not the head's weights nor its running marginal.
        checkpoint = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                      else resume_from_checkpoint)
        if checkpoint and (Path(checkpoint) / HEAD_WEIGHTS).is_file():
            self.environment_head.load(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _backbone(model) -> nn.Module:
    """The transformer body under the LM head (e.g. `Qwen2Model`), whatever wraps the causal LM."""
    from accelerate.utils import is_peft_model

    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, base.base_model_prefix)


CAUSAL_DPO = StageSpec(
    config_class=CausalDPOConfig,
    trainer_class=CausalDPOTrainer,
    build_datasets=build_datasets,
    description="CausalDPO: softmax DPO with inferred environments, backdoor adjustment and invariance",
    data_config=PreferenceDataConfig,
    trainer_kwargs=reference_model_kwargs,
)
