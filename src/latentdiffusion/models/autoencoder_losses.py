"""The VAE's training objective: a pixel loss plus the KL term (a beta-VAE), and optionally a
patch critic with hinge loss and the adaptive weight of Esser et al. 2021 ("Taming
Transformers", eq. 7), trained in the same backward pass as the autoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .vae import VAE, PixelLoss, VAEConfig, kl_to_standard_normal

# The adaptive weight's bounds: eps keeps it finite when the critic's gradient vanishes, and
# the clamp is Taming Transformers' (1e4).
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


def reconstruction_loss(logits: torch.Tensor, images: torch.Tensor,
                        kind: PixelLoss) -> torch.Tensor:
    """Mean per-pixel loss of pixel logits against images in [0, 1]: BCE on the logits, or the
    absolute / squared error of the decoded pixels sigmoid(logits)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, images)
    error = torch.sigmoid(logits) - images
    return error.abs().mean() if kind == "l1" else error.square().mean()


def vae_terms(model: nn.Module, images: torch.Tensor, noise: torch.Tensor,
              pixel_loss: PixelLoss = "bce", scale_equivariance: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean per-pixel loss, mean per-latent-element KL to N(0, I), the pixel logits) of a
    batch. With `scale_equivariance` w > 0 the pixel loss is L(D(z), x) + w L(D(avg2(z)),
    avg2(x)): the decoder must also draw the half-size image from the half-size latent, which
    keeps the latents free of detail finer than the image's (Skorokhodov et al. 2025, "Improving
    the Diffusability of Autoencoders")."""
    # through forward(), so DDP syncs the gradients of both decodes
    logits, mean, log_variance, *half = model(images, noise, half=scale_equivariance > 0)
    reconstruction = reconstruction_loss(logits, images, pixel_loss)
    if half:
        target = _unwrap(model).half_scale(images)  # (B, C_img, P/2, P/2)
        reconstruction = reconstruction + scale_equivariance * reconstruction_loss(
            half[0], target, pixel_loss)
    return reconstruction, kl_to_standard_normal(mean, log_variance).mean(), logits


def _unwrap(model: nn.Module) -> VAE:
    inner = getattr(model, "module", model)  # DDP keeps the VAE as .module
    assert isinstance(inner, VAE)
    return inner


def vae_loss(model: nn.Module, images: torch.Tensor, noise: torch.Tensor, kl_weight: float,
             pixel_loss: PixelLoss = "bce") -> torch.Tensor:
    """Mean per-pixel loss + kl_weight * mean per-latent-element KL (a beta-VAE objective).

    kl_weight trades sharpness for a Gaussian latent: too small and the posterior means drift
    far from N(0, I) (prior samples decode to garbage), too large and images blur. Its scale is
    relative to the pixel loss's: L2 errors are smaller than BCE values, so the same weight
    presses harder on the latents under L2.
    """
    reconstruction, kl, _ = vae_terms(model, images, noise, pixel_loss)
    return reconstruction + kl_weight * kl


class PatchCritic(nn.Module):
    """(B, C_img, H, H) -> (B, 1, H/4, H/4) realness logits, one per overlapping patch
    (PatchGAN, Isola et al. 2017): two stride-2 convs, no normalisation (a batch statistic
    would tie samples together)."""

    def __init__(self, image_channels: int, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(image_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 1, 3, padding=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images * 2 - 1)  # (B, 1, H/4, W/4)


def hinge_critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """(mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(reconstruction: torch.Tensor, generator: torch.Tensor,
                    last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||grad_w L_rec|| / (||grad_w L_G|| + eps) at the decoder's last weight w,
    clamped to [0, ADAPTIVE_MAX] and detached: the critic's term gets the reconstruction's
    gradient scale whatever the two losses' scales."""
    grad_rec, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    grad_gen, = torch.autograd.grad(generator, last_layer, retain_graph=True)
    weight = grad_rec.norm() / (grad_gen.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


class VAEWithCritic(nn.Module):
    """For training only: the VAE and its critic as one module whose forward is the whole
    loss, so that one optimizer and one backward pass train both (the stage exports
    `autoencoder`).

    loss = L_rec + beta KL + critic_weight * lambda * L_G + L_D, where L_G = -mean D(G(z))
    sees the critic's weights detached (it trains the autoencoder only) and L_D sees the
    reconstructions detached (it trains the critic only). The critic joins at step
    `critic_start`; `step` counts training forwards and is a buffer, so a checkpoint resumes it.
    """

    kind = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = VAE(config)  # first: the same initial weights as a VAE of this seed
        self.critic = PatchCritic(config.image_channels, config.critic_channels)
        self.step: torch.Tensor
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.terms: dict[str, torch.Tensor] = {}  # the last forward's loss terms, for the log

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        config = self.config
        reconstruction, kl, logits = vae_terms(self.autoencoder, images, noise, config.loss,
                                               config.scale_equivariance)
        loss = reconstruction + config.kl_weight * kl
        if not (self.training and torch.is_grad_enabled()):  # validation: the VAE's loss
            return loss
        step = int(self.step)
        self.step.add_(1)
        zero = torch.zeros((), device=loss.device)
        self.terms = {"reconstruction": reconstruction.detach(), "kl": kl.detach(),
                      "generator": zero, "critic": zero}
        if step < config.critic_start:
            return loss
        fakes = torch.sigmoid(logits)  # (B, C_img, H, H)
        frozen = {name: p.detach() for name, p in self.critic.named_parameters()}
        generator = -functional_call(self.critic, frozen, (fakes,)).mean()
        weight = adaptive_weight(reconstruction, generator, self.autoencoder.last_layer())
        critic = hinge_critic_loss(self.critic(images), self.critic(fakes.detach()))
        self.terms.update(generator=generator.detach(), critic=critic.detach())
        return loss + config.critic_weight * weight * generator + critic
