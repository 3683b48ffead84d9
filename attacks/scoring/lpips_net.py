"""LPIPS (Zhang et al., CVPR 2018) for Obscura: one network per process, real weights only.

Obscura reports LPIPS from the ``lpips`` package, ``net="alex"``, ``version="0.1"``, with
``normalize=True`` semantics (inputs in [0, 1] are mapped to [-1, 1]). The metric has two parts:

* the small linear calibration layers (``lin0..lin4``), shipped inside the ``lpips`` wheel as
  ``lpips/weights/v0.1/alex.pth`` and therefore available offline;
* the ImageNet AlexNet convolutional backbone, which ``lpips`` normally obtains from torchvision's
  pretrained-weight download.

The backbone is resolved in this order:

1. an explicit file given with :func:`configure` (``backbone_path=...``), else the file named by the
   environment variable ``OBSCURA_LPIPS_BACKBONE``. The file is a state dict holding torchvision
   AlexNet ``features.{0,3,6,8,10}.{weight,bias}`` tensors (a full torchvision AlexNet state dict
   also works; ``classifier.*`` keys are ignored). It is loaded with
   ``torch.load(path, map_location="cpu", weights_only=True)`` and copied into the LPIPS AlexNet
   slices; every backbone tensor must be assigned or :class:`LpipsUnavailable` is raised.
2. otherwise torchvision's standard pretrained AlexNet file (``alexnet-owt-7be5be79.pth``) from the
   torch hub cache (``$TORCH_HOME/hub/checkpoints``), downloading it when absent and
   :func:`configure` has not disabled downloads. A failed download raises
   :class:`LpipsUnavailable` telling the user to set ``OBSCURA_LPIPS_BACKBONE``.

The module never falls back to a randomly initialised backbone: an LPIPS value computed with one is
meaningless and would silently corrupt every comparison.

Images smaller than :data:`LPIPS_MIN_SIDE` (32 px) on their shorter side are upsampled bilinearly
(``align_corners=False``) so that their shorter side is :data:`LPIPS_UPSAMPLE_SIDE` (64 px) before
LPIPS: AlexNet's stride-4 first convolution and two 3×3/2 max-pools need at least 32 px for the five
LPIPS stages to have a non-empty output (16 px and 28 px inputs fail inside the network).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

__all__ = [
    "ENV_VAR",
    "LPIPS_MIN_SIDE",
    "LPIPS_UPSAMPLE_SIDE",
    "LpipsUnavailable",
    "configure",
    "get_lpips",
    "lpips_available",
    "lpips_distance",
    "lpips_features",
    "lpips_from_features",
    "lpips_matrix",
    "prepare_for_lpips",
]

logger = logging.getLogger(__name__)

ENV_VAR = "OBSCURA_LPIPS_BACKBONE"
"""Environment variable naming a local torchvision-AlexNet ``features.*`` state dict file."""

LPIPS_MIN_SIDE = 32
"""Shorter image side (px) below which images are upsampled before LPIPS."""

LPIPS_UPSAMPLE_SIDE = 64
"""Shorter image side (px) that small images are bilinearly upsampled to before LPIPS."""

_LPIPS_VERSION = "0.1"
_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


class LpipsUnavailable(RuntimeError):  # noqa: N818 (public API name)
    """LPIPS cannot be built with real weights (backbone file missing, unreadable or incomplete)."""


@dataclass
class _Options:
    """User options set through :func:`configure` (process-wide configuration, not state)."""

    backbone_path: Path | None = None
    allow_download: bool = True


_OPTIONS = _Options()


def configure(
    *, backbone_path: str | os.PathLike[str] | None = None, allow_download: bool = True
) -> None:
    """Set where the LPIPS AlexNet backbone comes from for this process.

    ``backbone_path`` takes precedence over the ``OBSCURA_LPIPS_BACKBONE`` environment variable;
    ``None`` restores the environment-variable / torch-hub resolution. ``allow_download=False``
    forbids the torch hub download of step 2 (a missing cached file then raises
    :class:`LpipsUnavailable` immediately). Already built networks stay cached under their source.
    """
    _OPTIONS.backbone_path = Path(backbone_path).expanduser() if backbone_path is not None else None
    _OPTIONS.allow_download = allow_download


def _torchvision_alexnet_url() -> str:
    """Return the URL of torchvision's ImageNet AlexNet weights (the standard LPIPS backbone)."""
    from torchvision.models import AlexNet_Weights

    return str(AlexNet_Weights.IMAGENET1K_V1.url)


def _hub_cache_file() -> Path:
    """Return where torch hub caches torchvision's AlexNet weights."""
    url = _torchvision_alexnet_url()
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _resolve_backbone() -> tuple[Path, str]:
    """Return ``(file, origin)`` of the AlexNet backbone to use, downloading it if needed.

    Raises :class:`LpipsUnavailable` when the configured file is missing or the download fails.
    """
    if _OPTIONS.backbone_path is not None:
        path = _OPTIONS.backbone_path
        origin = "attacks.scoring.lpips_net.configure(backbone_path=...)"
    elif os.environ.get(ENV_VAR):
        path, origin = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        return _hub_backbone()
    if not path.is_file():
        raise LpipsUnavailable(
            f"LPIPS AlexNet backbone file not found: {path} (set by {origin}). Point "
            f"{ENV_VAR} or attacks.scoring.lpips_net.configure(backbone_path=...) at a torchvision "
            "AlexNet state dict with features.{0,3,6,8,10}.{weight,bias} tensors."
        )
    return path, origin


def _hub_backbone() -> tuple[Path, str]:
    """Return torchvision's AlexNet file from the torch hub cache, downloading it if allowed."""
    cached = _hub_cache_file()
    if cached.is_file():
        return cached, "torch hub cache"
    hint = (
        f"set {ENV_VAR} (or call attacks.scoring.lpips_net.configure(backbone_path=...)) to a "
        "local torchvision AlexNet features state dict file, e.g. shared/weights/"
        "lpips_alexnet_features.pth"
    )
    if not _OPTIONS.allow_download:
        raise LpipsUnavailable(
            f"LPIPS AlexNet backbone not in the torch hub cache ({cached}) and downloads are "
            f"disabled; {hint}."
        )
    url = _torchvision_alexnet_url()
    cached.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading the LPIPS AlexNet backbone from %s to %s", url, cached)
    match = torch.hub.HASH_REGEX.search(cached.name)
    try:
        torch.hub.download_url_to_file(
            url, str(cached), hash_prefix=match.group(1) if match else None, progress=False
        )
    except (OSError, RuntimeError) as exc:
        raise LpipsUnavailable(
            f"Could not download torchvision's AlexNet weights for LPIPS from {url} ({exc}); "
            f"{hint}."
        ) from exc
    return cached, f"downloaded from {url}"


def _linear_weights_file() -> Path:
    """Return the LPIPS v0.1 'alex' linear-layer weights file shipped inside the lpips package."""
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / f"v{_LPIPS_VERSION}" / "alex.pth"


def _load_backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a torchvision-AlexNet state dict file and return its ``features.*`` tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise LpipsUnavailable(f"Cannot read LPIPS AlexNet backbone file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise LpipsUnavailable(
            f"LPIPS AlexNet backbone file {path} holds a {type(state).__name__}, not a state dict."
        )
    return {
        k: v for k, v in state.items() if k.startswith("features.") and isinstance(v, torch.Tensor)
    }


def _build_from_file(path: Path) -> torch.nn.Module:
    """Build ``lpips.LPIPS`` (alex, v0.1) on CPU with the backbone copied from ``path``.

    Raises :class:`LpipsUnavailable` when a backbone tensor is missing or has the wrong shape, or
    when the calibrated linear layers shipped with lpips are absent or were not loaded.
    """
    import lpips

    lin_file = _linear_weights_file()
    if not lin_file.is_file():
        raise LpipsUnavailable(
            f"The lpips package lacks its calibrated linear weights {lin_file}; reinstall lpips."
        )
    features = _load_backbone_state(path)
    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision.models.alexnet(pretrained=False), which only warns that
        # the argument is deprecated; pnet_rand=True means no download is attempted.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
        model: torch.nn.Module = lpips.LPIPS(
            net="alex", version=_LPIPS_VERSION, pretrained=True, pnet_rand=True, verbose=False
        )
    model_state = model.state_dict()

    targets = {
        k: f"features.{m.group(1)}.{m.group(2)}" for k in model_state if (m := _SLICE_KEY.match(k))
    }
    missing = sorted(src for src in targets.values() if src not in features)
    if missing:
        raise LpipsUnavailable(
            f"LPIPS AlexNet backbone file {path} lacks tensors {missing}; expected torchvision "
            "AlexNet keys features.{0,3,6,8,10}.{weight,bias}."
        )
    assigned = 0
    with torch.no_grad():
        for dst, src in targets.items():
            if tuple(features[src].shape) != tuple(model_state[dst].shape):
                raise LpipsUnavailable(
                    f"LPIPS AlexNet backbone file {path}: {src} has shape "
                    f"{tuple(features[src].shape)}, expected {tuple(model_state[dst].shape)}."
                )
            model_state[dst].copy_(features[src])
            assigned += 1
    n_backbone = sum(1 for _ in cast(torch.nn.Module, model.net).parameters())
    if assigned != n_backbone or assigned != 10:
        raise LpipsUnavailable(
            f"Assigned {assigned} backbone tensors from {path} but the LPIPS AlexNet has "
            f"{n_backbone} (expected 10); the lpips package layout is not the one supported."
        )

    lin_state = torch.load(lin_file, map_location="cpu", weights_only=True)
    bad = sorted(
        k
        for k, v in lin_state.items()
        if k not in model_state or not torch.equal(model_state[k], v)
    )
    if bad or not lin_state:
        raise LpipsUnavailable(
            f"The LPIPS linear layers were not loaded from {lin_file} (keys {bad})."
        )
    return model


@functools.cache
def _build_cached(device: str, backbone: str) -> torch.nn.Module:
    """Build, freeze and move the LPIPS network once per (device, backbone file)."""
    model = _build_from_file(Path(backbone))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    logger.info("Built LPIPS alex v%s on %s with backbone %s", _LPIPS_VERSION, device, backbone)
    return model.to(torch.device(device))


def get_lpips(
    device: str | torch.device = "cpu", backbone: str | os.PathLike[str] | None = None
) -> torch.nn.Module:
    """Return the process-wide ``lpips.LPIPS`` (alex, v0.1, real weights) on ``device``.

    ``backbone`` is the AlexNet backbone file to use; None resolves it as :func:`configure`
    says. The network is built once per device and backbone file (``functools`` cache) and is
    frozen in eval mode. Raises :class:`LpipsUnavailable` with the reason and the remedy
    (``OBSCURA_LPIPS_BACKBONE`` / :func:`configure`) when real weights cannot be loaded.
    """
    if backbone is None:
        path, _origin = _resolve_backbone()
    else:
        path = Path(backbone).expanduser()
        if not path.is_file():
            raise LpipsUnavailable(
                f"LPIPS AlexNet backbone file {path} does not exist (the study's lpips_backbone)"
            )
    return _build_cached(str(torch.device(device)), str(path.resolve()))


def lpips_available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Tell the user whether LPIPS can be computed, and from which backbone or why not."""
    try:
        path, origin = _resolve_backbone()
        get_lpips(device)
    except LpipsUnavailable as exc:
        return False, str(exc)
    return True, f"LPIPS alex v{_LPIPS_VERSION} ready; backbone {path} ({origin})"


def prepare_for_lpips(images: torch.Tensor) -> torch.Tensor:
    """Turn a (B, C, H, W) batch in [0, 1] into LPIPS input: float32, clamped, 3 channels, >=32 px.

    Grey images (C=1) are repeated to 3 channels. When the shorter side is below
    :data:`LPIPS_MIN_SIDE`, the batch is bilinearly upsampled (``align_corners=False``,
    aspect ratio kept) so the shorter side becomes :data:`LPIPS_UPSAMPLE_SIDE`. Values stay in
    [0, 1]; the LPIPS call applies the ``normalize=True`` mapping to [-1, 1].
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    x = images.detach().to(torch.float32).clamp(0.0, 1.0)
    channels = x.shape[1]
    if channels == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels != 3:
        raise ValueError(f"LPIPS needs 1 or 3 channels, got {channels}")
    height, width = x.shape[-2:]
    short = min(height, width)
    if short < LPIPS_MIN_SIDE:
        scale = LPIPS_UPSAMPLE_SIDE / short
        size = (round(height * scale), round(width * scale))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise ValueError unless ``a`` and ``b`` are image batches with the same C, H, W."""
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"expected two (B, C, H, W) batches of equal image size, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def lpips_distance(
    a: torch.Tensor, b: torch.Tensor, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Return LPIPS(a[i], b[i]) for aligned (B, C, H, W) batches in [0, 1], as a CPU tensor (B,).

    Uses ``lpips.LPIPS.forward(..., normalize=True)`` after :func:`prepare_for_lpips`.
    """
    _check_pair(a, b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} and {b.shape[0]}")
    model = get_lpips(device)
    dev = torch.device(device)
    with torch.no_grad():
        out: torch.Tensor = model(
            prepare_for_lpips(a).to(dev), prepare_for_lpips(b).to(dev), normalize=True
        )
    return out.reshape(-1).cpu()


def _normalised_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Return LPIPS' unit-normalised AlexNet activations of a prepared batch (as in forward)."""
    import lpips

    net, scaling = cast(torch.nn.Module, model.net), cast(torch.nn.Module, model.scaling_layer)
    outs = net(scaling(2.0 * x - 1.0))
    return [lpips.normalize_tensor(outs[k]) for k in range(cast(int, model.L))]


def lpips_features(
    images: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    backbone: str | os.PathLike[str] | None = None,
) -> list[torch.Tensor]:
    """LPIPS' unit-normalised AlexNet activations of a (B, C, H, W) batch in [0, 1], one tensor
    per layer on ``device``: computed once, compared with :func:`lpips_from_features` (e.g. a
    fixed identification pool against every reconstruction)."""
    if images.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got {tuple(images.shape)}")
    model = get_lpips(device, backbone)
    with torch.no_grad():
        return _normalised_features(model, prepare_for_lpips(images).to(torch.device(device)))


def lpips_from_features(
    feats_a: list[torch.Tensor],
    feats_b: list[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    backbone: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """D (CPU, float64) with D[i, j] = LPIPS between image i of ``feats_a`` and image j of
    ``feats_b`` (both from :func:`lpips_features` with the same ``device`` and ``backbone``):
    the per-layer squared differences through the calibrated linear layers, as in
    ``lpips.LPIPS.forward``."""
    model = get_lpips(device, backbone)
    n, m = feats_a[0].shape[0], feats_b[0].shape[0]
    layers, lins = cast(int, model.L), cast(torch.nn.ModuleList, model.lins)
    out = torch.zeros(n, m, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            row = torch.zeros(m, dtype=torch.float32, device=feats_b[0].device)
            for k in range(layers):
                diff = (feats_a[k][i : i + 1] - feats_b[k]) ** 2
                row += lins[k](diff).mean(dim=(1, 2, 3))
            out[i] = row.cpu().to(torch.float64)
    return out


def lpips_matrix(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    backbone: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Return the LPIPS distance matrix D (CPU, float64) with D[i, j] = LPIPS(a[i], b[j]).

    Features of each image are computed once and the per-layer squared differences go through the
    calibrated linear layers exactly as in ``lpips.LPIPS.forward`` (alex, v0.1, normalize=True),
    so the diagonal equals :func:`lpips_distance` up to float32 rounding.
    """
    _check_pair(a, b)
    feats_a = lpips_features(a, device=device, backbone=backbone)
    feats_b = lpips_features(b, device=device, backbone=backbone)
    return lpips_from_features(feats_a, feats_b, device=device, backbone=backbone)
