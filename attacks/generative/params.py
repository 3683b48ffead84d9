"""Parameters of ``gias`` (:mod:`attacks.generative`) and of the generator it trains."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from attacks.base import AttackParams


class GeneratorParams(BaseModel):
    """A DCGAN (Radford, Metz, Chintala, ICLR 2016) trained on the attacker's public images:
    GIAS's image prior (Jeon et al. 2021 use a DCGAN at 32 px)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    latent: int = Field(100, ge=2, le=4096, description="Dimension of the latent code z.")
    width: int = Field(
        32,
        ge=4,
        le=512,
        description="Channels of the generator's last hidden layer (DCGAN's ngf; doubled per "
        "layer toward the 4x4 start; the discriminator mirrors it).",
    )
    epochs: int = Field(40, ge=1, le=10_000, description="Training epochs over the public images.")
    learning_rate: float = Field(
        2e-4, gt=0, le=1, description="Adam's learning rate (DCGAN: 2e-4, betas 0.5, 0.999)."
    )
    minibatch: int = Field(64, ge=2, le=65_536, description="Public images per Adam step.")


class GIASParams(AttackParams):
    """Gradient Inversion with Generative Image Prior (Jeon et al., NeurIPS 2021). Defaults
    are the paper's 32 px script (``scripts/ours_v2_bs4.sh``): latent search 500 Adam
    iterations at lr 3e-2 from 3 random codes, then 5,000 iterations of generator fine-tuning
    (lr 1e-4 here: see ``finetune_lr``), both with step decay; TV 1e-6; cosine gradient
    matching."""

    iterations: int = Field(500, ge=1, description="Adam iterations of the latent search.")
    lr: float = Field(3e-2, gt=0, description="Adam's step size in the latent search.")
    latent_restarts: int = Field(
        3,
        ge=1,
        le=64,
        description="Random latent codes searched one after another; the one whose gradient "
        "matches best is fine-tuned.",
    )
    finetune_iterations: int = Field(
        5000,
        ge=0,
        description="Adam iterations of fine-tuning one copy of the generator per image from "
        "the best codes (0: latent search only, 'GI' in the paper).",
    )
    finetune_lr: float = Field(
        1e-4,
        gt=0,
        description="Adam's step size in the fine-tuning (the paper's 1e-3 is for StyleGAN2, "
        "whose weights are N(0, 1) scaled at run time; on the DCGAN's N(0, 0.02) weights it "
        "raised the matching loss, 1e-4 lowers it).",
    )
    anchor: float = Field(
        0.0,
        ge=0,
        description="Weight of a pull of the fine-tuned images toward the latent search's "
        "(mean squared distance in [0, 1] pixels; an extension: 0 is the paper's GIAS).",
    )
    tv: float = Field(1e-6, ge=0, description="Weight of the total-variation prior.")
    decay: bool = Field(
        True, description="Step decay by 0.1 at 3/8, 5/8 and 7/8 of each phase's iterations."
    )
    labels: Literal["auto", "known", "infer"] = Field(
        "auto",
        description="How the attack obtains the batch's labels: 'known' (granted: "
        "knows_labels), 'infer' (read off the last layer's update, attacks.infer_labels) or "
        "'auto' (known when granted, else inferred).",
    )
    generator: GeneratorParams = Field(
        default_factory=GeneratorParams,
        description="The DCGAN trained on the public images (latent, width, epochs, ...).",
    )
