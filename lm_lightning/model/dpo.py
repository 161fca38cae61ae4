"""Direct preference optimisation: the settings, the per-pair losses as trl's ``DPOTrainer`` defines them, and
exact split-level metrics.

With ``r_c = log pi(chosen) - log ref(chosen)`` and ``r_r`` the same for the rejected side (each a sum over
the completion's tokens) and ``delta = r_c - r_r``, the loss of a pair is:

- ``sigmoid`` (DPO): ``-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)``, ``eps`` the
  ``label_smoothing`` of conservative DPO (trl's ``sigmoid`` up to 0.2x; trl 1.x moved the smoothing into its
  ``robust`` and ``exo_pair`` losses, and its ``sigmoid`` is this with ``eps = 0``);
- ``hinge``: ``relu(1 - beta * delta)``;
- ``ipo``: ``(delta_avg - 1 / (2 * beta)) ** 2``, where ``delta_avg`` divides each side's log-ratio by its
  number of completion tokens first, as trl does (its comment: the IPO authors' normalised form).

The rewards are ``beta * r_c`` and ``beta * r_r`` (sums, for every loss, as trl 1.x logs them); the accuracy
is the share of pairs with ``beta * r_c > beta * r_r``. At the start (policy = reference) every ``r`` is 0:
the sigmoid loss is ``log 2``, the hinge loss 1 and the IPO loss ``1 / (4 beta^2)``.

The loss of a step is the mean over its pairs: each pair weighs the same, whichever micro-batch or process it
is in (``preference_objective`` divides the sum over a micro-batch's pairs by the step's number of pairs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lm_lightning.model.loss import ExactSums

DPOLoss = Literal["sigmoid", "ipo", "hinge"]
Objective = Literal["lm", "dpo"]
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
# Split-level metrics: logged as f"{split}/{name}".
REWARD_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


@dataclasses.dataclass
class DPOSettings:
    """Preference tuning (``--model.objective dpo``).

    Args:
        beta: Strength of the pull towards the reference (trl's ``beta``; IPO's ``tau``).
        loss: ``sigmoid`` (DPO), ``ipo`` or ``hinge``.
        label_smoothing: Conservative DPO: the assumed share of flipped labels, in [0, 0.5) (``sigmoid``).
        precompute_reference: Without LoRA: the reference's log-probabilities computed once before training
            (stored with the cached data), so training holds one model and runs one forward pass per step;
            otherwise a frozen copy of the starting model. Under LoRA the reference is the model with its
            adapters disabled either way; this still saves its forward pass.
        disable_dropout: Dropout off in the policy (trl's default), so that policy and reference agree at the
            start and the loss is that of the weights, not of a dropout draw.
    """

    beta: float = 0.1
    loss: DPOLoss = "sigmoid"
    label_smoothing: float = 0.0
    precompute_reference: bool = False
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta} must be positive, e.g. 0.1.")
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"dpo.loss={self.loss!r} is unknown; choose one of {list(DPO_LOSSES)}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5).")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(
                f"dpo.label_smoothing={self.label_smoothing} is for the sigmoid loss (conservative DPO), not "
                f"dpo.loss={self.loss!r}: set it to 0 or use --model.dpo.loss sigmoid."
            )


def dpo_settings(
    objective: str, value: DPOSettings | dict[str, Any] | None, model_name_or_path: str | None
) -> DPOSettings | None:
    """The DPO settings of ``objective`` (``None`` for ``lm``), checked against the other settings."""
    if objective not in ("lm", "dpo"):
        raise ValueError(f"objective={objective!r} is unknown; choose 'lm' (next-token loss) or 'dpo'.")
    if objective == "lm":
        if value is not None:
            raise ValueError(
                "dpo is set but objective='lm': set --model.objective dpo to tune on preference pairs, or "
                "drop --model.dpo."
            )
        return None
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(DPOSettings)}
        if unknown:
            raise ValueError(f"dpo={value!r} is invalid: unknown keys {sorted(unknown)}.")
        value = DPOSettings(**value)
    if model_name_or_path is None:
        raise ValueError(
            "objective='dpo' tunes a pretrained model against itself (the reference), and this one is "
            "trained from scratch: set --model.model_name_or_path (e.g. the SFT model's folder)."
        )
    return value or DPOSettings()


def pair_losses(
    policy: Tensor, reference: Tensor, n_targets: Tensor, settings: DPOSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair: the loss, and the chosen and rejected rewards (detached). ``(B,)`` each.

    ``policy`` and ``reference`` are the ``(2B,)`` completion log-probabilities of a batch, its ``B`` chosen
    sequences first, and ``n_targets`` their numbers of completion tokens.
    """
    chosen, rejected = (policy.float() - reference.float()).chunk(2)  # the log-ratios r_c, r_r
    beta = settings.beta
    if settings.loss == "ipo":
        n_chosen, n_rejected = n_targets.clamp_min(1).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        delta = chosen - rejected
        if settings.loss == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:
            eps = settings.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def pair_rewards(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """Per pair, the values of ``REWARD_NAMES`` (their means over pairs are the logged figures)."""
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype),
    }


class PreferenceMetrics(ExactSums):
    """The DPO loss and rewards as means over every pair of a split, summed across processes, and the
    token-weighted perplexities of the chosen and of the rejected completions under the policy."""

    _SUMS = ("loss", "chosen", "rejected", "correct", "chosen_nll", "rejected_nll")
    _COUNTS = ("pairs", "chosen_tokens", "rejected_tokens")

    def __init__(self) -> None:
        super().__init__()
        for name in self._SUMS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in self._COUNTS:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, losses: Tensor, chosen: Tensor, rejected: Tensor, policy: Tensor, n_targets: Tensor
    ) -> None:
        """Add a batch's per-pair losses and rewards, and its ``(2B,)`` completion log-probabilities.

        Out of place: states reset in inference mode (a ``validate`` before a ``fit``) refuse in-place adds.
        """
        f64 = torch.float64
        logp_chosen, logp_rejected = policy.detach().to(f64).chunk(2)
        n_chosen, n_rejected = n_targets.chunk(2)
        self.loss = self.loss + losses.detach().to(f64).sum()
        self.chosen = self.chosen + chosen.to(f64).sum()
        self.rejected = self.rejected + rejected.to(f64).sum()
        self.correct = self.correct + (chosen > rejected).to(f64).sum()
        self.pairs = self.pairs + losses.numel()
        self.chosen_nll = self.chosen_nll - logp_chosen.sum()
        self.rejected_nll = self.rejected_nll - logp_rejected.sum()
        self.chosen_tokens = self.chosen_tokens + n_chosen.sum()
        self.rejected_tokens = self.rejected_tokens + n_rejected.sum()

    def compute(self) -> dict[str, Tensor]:
        """``loss``, ``REWARD_NAMES``, ``perplexity`` (of the chosen completions), ``perplexity_rejected``;
        NaN for a split without pairs."""
        pairs = self.pairs.to(torch.float64)
        return {
            "loss": self.loss / pairs,
            "rewards/chosen": self.chosen / pairs,
            "rewards/rejected": self.rejected / pairs,
            "rewards/margin": (self.chosen - self.rejected) / pairs,
            "rewards/accuracy": self.correct / pairs,
            "perplexity": torch.exp(self.chosen_nll / self.chosen_tokens),
            "perplexity_rejected": torch.exp(self.rejected_nll / self.rejected_tokens),
        }
