"""Tests of the Obscura metric protocol (attacks.scoring.metrics), LPIPS loading and the pair-grid
plot."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color, data, transform
from skimage.metrics import structural_similarity

from attacks.scoring import lpips_net
from attacks.scoring.lpips_net import (
    ENV_VAR,
    LpipsUnavailable,
    configure,
    get_lpips,
    lpips_available,
    lpips_distance,
    lpips_matrix,
)
from attacks.scoring.metrics import (
    DEFAULT_SUCCESS_PSNR,
    FLAT_VALUE,
    PSNR_CAP,
    flat_image_psnr,
    flat_value,
    match,
    psnr,
    score,
    score_images,
    ssim,
)
from attacks.scoring.plots import save_pair_grid

DATA_DIR = Path(__file__).resolve().parent / "data"
BACKBONE_NAME = "weights/lpips_alexnet_features.pth"


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(autouse=True)
def _default_lpips_options() -> Iterator[None]:
    """Restore the default LPIPS options after each test (tests call configure())."""
    yield
    configure()


# ``shared_dir`` (the ../shared folder, skipping when absent) comes from tests/conftest.py.


@pytest.fixture
def shared_backbone(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point OBSCURA_LPIPS_BACKBONE at the shared real AlexNet backbone (skip when absent)."""
    path = shared_dir / BACKBONE_NAME
    if not path.is_file():
        pytest.skip(f"shared LPIPS AlexNet backbone {path} is absent")
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


@pytest.fixture
def missing_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point OBSCURA_LPIPS_BACKBONE at a file that does not exist."""
    path = tmp_path / "no_such_alexnet.pth"
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


def _square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an HWC/HW uint8 image to a square and resize it to ``size`` px, in [0, 1]."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top : top + side, left : left + side]
    return transform.resize(crop, (size, size), anti_aliasing=True).astype(np.float64)


def real_batch(size: int = 32, grey: bool = False) -> torch.Tensor:
    """Return six real photographs (skimage.data) as a (6, C, size, size) float64 batch."""
    images = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        img = _square(getattr(data, name)(), size)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        if grey:
            img = color.rgb2gray(img)[..., None]
        images.append(torch.from_numpy(img).permute(2, 0, 1))
    return torch.stack(images).clamp(0.0, 1.0)


def load_png(name: str) -> torch.Tensor:
    """Load a test PNG from tests/attacks/data as a (1, 3, H, W) float32 tensor in [0, 1]."""
    arr = np.asarray(Image.open(DATA_DIR / name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def assert_no_nan(value: Any) -> None:
    """Assert that no float anywhere in a (nested) result is NaN or infinite."""
    if isinstance(value, dict):
        for v in value.values():
            assert_no_nan(v)
    elif isinstance(value, list | tuple):
        for v in value:
            assert_no_nan(v)
    elif isinstance(value, float):
        assert math.isfinite(value)


# --------------------------------------------------------------------------- PSNR / SSIM


def test_identical_images_psnr_cap_and_ssim_one() -> None:
    img = real_batch(32)[0]
    assert psnr(img, img) == PSNR_CAP
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value_for_constant_offset() -> None:
    a = real_batch(32)[1] * 0.8
    b = a + 0.1
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    assert psnr(a, a + 0.01) == pytest.approx(40.0, abs=1e-9)


def test_psnr_clamps_inputs() -> None:
    a = torch.zeros(3, 8, 8)
    assert psnr(a - 5.0, a) == PSNR_CAP
    assert psnr(a + 2.0, a) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("grey", "size"), [(False, 32), (True, 32), (False, 16), (True, 16)])
def test_ssim_matches_skimage_protocol(grey: bool, size: int) -> None:
    batch = real_batch(size, grey=grey)
    a, b = batch[0], (batch[0] * 0.7 + 0.1).clamp(0, 1)
    got = ssim(a, b)
    a_np, b_np = a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()
    if grey:
        want = structural_similarity(a_np[..., 0], b_np[..., 0], data_range=1.0, win_size=7)
    else:
        want = structural_similarity(a_np, b_np, data_range=1.0, win_size=7, channel_axis=-1)
    assert got == pytest.approx(float(want), abs=1e-12)
    assert 0.0 < got < 1.0
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_small_images_use_largest_odd_window() -> None:
    a = real_batch(6)[0]
    b = (a + 0.05).clamp(0, 1)
    want = structural_similarity(
        a.permute(1, 2, 0).numpy(),
        b.permute(1, 2, 0).numpy(),
        data_range=1.0,
        win_size=5,
        channel_axis=-1,
    )
    assert ssim(a, b) == pytest.approx(float(want), abs=1e-12)
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))


# --------------------------------------------------------------------------- matching / score


def test_match_mse_recovers_permutation() -> None:
    truth = real_batch(32)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assignment = match(truth[perm], truth, cost="mse")
    assert assignment == torch.argsort(perm).tolist()


def test_match_lpips_recovers_permutation(shared_backbone: Path) -> None:
    truth = real_batch(32)
    perm = torch.tensor([2, 5, 0, 4, 1, 3])
    assert match(truth[perm], truth, cost="lpips") == torch.argsort(perm).tolist()


@pytest.mark.parametrize("use_lpips", [True, False])
def test_score_permuted_batch_is_matched_back(shared_backbone: Path, use_lpips: bool) -> None:
    truth_images = real_batch(32)
    true_labels = torch.tensor([0, 1, 2, 3, 4, 5])
    perm = torch.tensor([4, 2, 0, 5, 3, 1])
    rec = SimpleNamespace(images=truth_images[perm].float(), labels=true_labels[perm])
    truth = SimpleNamespace(images=truth_images.float(), labels=true_labels)
    result = score(rec, truth, lpips=use_lpips)

    assert result["assignment"] == torch.argsort(perm).tolist()
    assert result["assignment_cost"] == ("lpips" if use_lpips else "mse")
    assert result["n_images"] == 6
    assert result["psnr_min"] == PSNR_CAP and result["psnr_mean"] == PSNR_CAP
    assert result["ssim_mean"] == pytest.approx(1.0, abs=1e-9)
    assert result["label_accuracy"] == 1.0
    assert result["success_rate"] == 1.0
    assert result["success_psnr"] == DEFAULT_SUCCESS_PSNR
    if use_lpips:
        assert result["lpips_status"] == "ok"
        assert result["lpips_mean"] == pytest.approx(0.0, abs=1e-6)
        assert all(r["lpips"] == pytest.approx(0.0, abs=1e-6) for r in result["per_image"])
    else:
        assert result["lpips_mean"] is None and "disabled" in result["lpips_status"]
    assert [r["index"] for r in result["per_image"]] == list(range(6))
    assert all(r["label_correct"] is True for r in result["per_image"])
    assert_no_nan(result)


def test_labels_follow_assignment() -> None:
    truth_images = real_batch(32)
    true_labels = torch.tensor([0, 1, 1, 0, 1, 0])
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    rec_labels = true_labels[perm].clone()
    rec_labels[0] = 1 - rec_labels[0]  # reconstruction 0 (= true image 1) gets a wrong label
    result = score_images(truth_images[perm], truth_images, rec_labels, true_labels, lpips=False)
    assert result["assignment"][1] == 0
    assert result["label_accuracy"] == pytest.approx(5 / 6)
    correct = [r["label_correct"] for r in result["per_image"]]
    assert correct == [True, False, True, True, True, True]


def test_no_labels_give_none_and_success_threshold() -> None:
    truth = real_batch(16)
    rec = truth.clone()
    rec[0] = (rec[0] + 0.1).clamp(0, 1)  # about 20 dB or a bit more
    rec[1] = rec[1] * 0.0 + 0.5  # far off
    result = score_images(rec, truth, lpips=False, success_psnr=30.0)
    assert result["label_accuracy"] is None
    assert all(r["label_correct"] is None for r in result["per_image"])
    assert result["success_rate"] == pytest.approx(4 / 6)
    assert result["psnr_max"] == PSNR_CAP
    assert result["psnr_min"] < 20.0
    assert_no_nan(result)


def test_nonfinite_reconstructions_stay_finite() -> None:
    truth = real_batch(16)
    rec = truth.clone()
    rec[2, 0, 0, 0] = float("nan")
    rec[3, 1, 2, 2] = float("inf")
    result = score_images(rec, truth, lpips=False)
    assert result["rec_nonfinite_pixels"] == 2
    assert_no_nan(result)
    with pytest.raises(ValueError, match="non-finite"):
        score_images(truth, rec, lpips=False)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        score_images(real_batch(16), real_batch(32), lpips=False)


# --------------------------------------------------------------------------- flat baseline


def _flat_like(truth: torch.Tensor, value: tuple[float, ...]) -> torch.Tensor:
    """A batch shaped like ``truth`` whose every image is flat at ``value`` (per channel)."""
    return torch.tensor(value, dtype=torch.float64).view(1, -1, 1, 1).expand_as(truth).clone()


@pytest.mark.parametrize(("grey", "value"), [(False, (0.3, 0.4, 0.6)), (True, (0.57,))])
def test_flat_image_at_the_mean_has_zero_gain(grey: bool, value: tuple[float, ...]) -> None:
    truth = real_batch(16, grey=grey)
    result = score_images(_flat_like(truth, value), truth, lpips=False, flat=value)
    assert result["flat_value"] == list(value)
    assert all(abs(r["psnr_gain"]) < 1e-9 for r in result["per_image"])
    for stat in ("mean", "median", "max", "min"):
        assert abs(result[f"psnr_gain_{stat}"]) < 1e-9
    assert result["flat_psnr_mean"] == pytest.approx(result["psnr_mean"], abs=1e-9)
    assert 0.0 < result["psnr_max"] < 30.0  # a flat image is a poor reconstruction of photos


def test_perfect_reconstruction_gains_the_cap_minus_the_flat_psnr() -> None:
    truth = real_batch(16)
    flat = flat_image_psnr(truth, 0.5)
    by_hand = [10 * math.log10(1 / float(((t - 0.5) ** 2).mean())) for t in truth]
    assert flat == pytest.approx(by_hand, abs=1e-9)
    result = score_images(truth, truth, lpips=False)  # default flat value 0.5
    assert result["flat_value"] == [FLAT_VALUE] * 3  # one value broadcast to every channel
    for row, f in zip(result["per_image"], flat, strict=True):
        assert row["psnr"] == PSNR_CAP
        assert row["psnr_gain"] == pytest.approx(PSNR_CAP - f, abs=1e-12)
    assert result["psnr_gain_max"] == pytest.approx(PSNR_CAP - min(flat), abs=1e-12)
    assert result["psnr_gain_min"] == pytest.approx(PSNR_CAP - max(flat), abs=1e-12)
    assert_no_nan(result)


def test_flat_value_broadcasts_and_is_validated() -> None:
    truth = real_batch(16)
    assert flat_image_psnr(truth, 0.4) == flat_image_psnr(truth, (0.4, 0.4, 0.4))
    assert flat_image_psnr(truth, 1.5) == flat_image_psnr(truth, 1.0)  # clamped like images
    with pytest.raises(ValueError, match="channels"):
        score_images(truth, truth, lpips=False, flat=(0.1, 0.2))
    with pytest.raises(ValueError, match="finite"):
        flat_image_psnr(truth, float("nan"))


def test_flat_value_is_the_normalisation_mean_or_grey() -> None:
    assert flat_value((0.3,), (0.2,)) == (0.3,)
    assert flat_value((0.4, 0.25, 0.16), (0.3, 0.2, 0.1)) == (0.4, 0.25, 0.16)
    assert flat_value((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) == (FLAT_VALUE,)  # no normalisation
    assert flat_value((), ()) == (FLAT_VALUE,)
    assert flat_value((0.0,), (0.5,)) == (0.0,)  # a real normalisation whose mean is 0
    with pytest.raises(ValueError, match="finite"):
        flat_value((float("inf"),), (1.0,))


@pytest.mark.parametrize(("mean", "std", "want"), [((0.3,), (0.2,), (0.3,)), (None, None, (0.5,))])
def test_reconstruction_carries_the_observations_flat_value(
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None, want: tuple[float, ...]
) -> None:
    from attacks import get_attack
    from fl import models
    from fl.simulation import observe_client_step
    from tests._support.samples import sample_images

    torch.manual_seed(0)
    model = models.build("lenet", channels=1, classes=2, image_size=16)
    images, labels = sample_images(16, 2, channels=1), torch.tensor([0, 1])
    obs, truth = observe_client_step(model, images, labels, mean=mean, std=std)
    rec = get_attack("idlg", iterations=2).run(obs)
    assert rec.flat_value == want
    result = score(rec, truth, lpips=False)
    assert result["flat_value"] == list(want)
    flat = flat_image_psnr(truth.images, want)
    for row in result["per_image"]:
        assert row["psnr"] - row["psnr_gain"] == pytest.approx(flat[row["index"]], abs=1e-9)


def test_flat_baseline_on_fundus_photographs(shared_dir: Path) -> None:
    """RetinaMNIST: a flat image already scores above 10 dB, and the dataset mean is a harder
    baseline than mid grey (it minimises the pooled squared error, up to the train/test shift)."""
    from fl import data as fl_data

    d = fl_data.load("retinamnist", root=shared_dir / "data", split="test", image_size=16)
    truth = d.float_images()[:200]
    at_mean = np.asarray(flat_image_psnr(truth, flat_value(d.mean, d.std)))
    grey = np.asarray(flat_image_psnr(truth, FLAT_VALUE))
    assert at_mean.mean() > 10.0 and grey.mean() > 5.0
    pooled = [float(np.mean(10.0 ** (-p / 10.0))) for p in (at_mean, grey)]  # mean MSE
    assert pooled[0] < pooled[1]


# --------------------------------------------------------------------------- LPIPS


def test_lpips_reproduces_published_example_values(shared_backbone: Path) -> None:
    ref, p0, p1 = load_png("ex_ref.png"), load_png("ex_p0.png"), load_png("ex_p1.png")
    d = lpips_distance(torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(0.722, abs=1e-3)
    assert d[1].item() == pytest.approx(0.138, abs=1e-3)
    # The matrix path (features computed once) agrees with lpips.LPIPS.forward.
    m = lpips_matrix(ref, torch.cat([p0, p1, ref]))
    assert m[0, :2].tolist() == pytest.approx(d.tolist(), abs=1e-5)
    assert m[0, 2].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("size", [16, 28, 32])
def test_lpips_small_and_grey_images(shared_backbone: Path, size: int) -> None:
    for grey in (False, True):
        batch = real_batch(size, grey=grey).float()
        noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(0))
        noisy = (batch + 0.02 * noise).clamp(0, 1)
        same = lpips_distance(batch, batch)
        near = lpips_distance(batch, noisy)
        far = lpips_distance(batch, batch.roll(1, dims=0))
        assert torch.all(same.abs() < 1e-6)
        assert torch.all(near > same)
        assert torch.all(far > near)
        assert torch.isfinite(far).all()


def test_get_lpips_is_cached_and_real(shared_backbone: Path) -> None:
    first = get_lpips("cpu")
    assert get_lpips("cpu") is first
    assert get_lpips(torch.device("cpu")) is first
    assert not first.training
    backbone = torch.load(shared_backbone, map_location="cpu", weights_only=True)
    assert torch.equal(first.net.slice5[0].weight, backbone["features.10.weight"])
    ok, message = lpips_available()
    assert ok and "ready" in message and shared_backbone.name in message


def test_configure_takes_precedence_over_env(shared_backbone: Path, tmp_path: Path) -> None:
    missing = tmp_path / "configured_missing.pth"
    configure(backbone_path=missing)
    with pytest.raises(LpipsUnavailable, match=r"configured_missing\.pth"):
        get_lpips()
    configure(backbone_path=shared_backbone)
    assert get_lpips() is get_lpips()


def test_missing_backbone_raises_and_score_degrades(missing_backbone: Path) -> None:
    with pytest.raises(LpipsUnavailable) as info:
        get_lpips()
    assert str(missing_backbone) in str(info.value)
    assert ENV_VAR in str(info.value)
    ok, message = lpips_available()
    assert not ok and str(missing_backbone) in message

    truth = real_batch(32)
    perm = torch.tensor([1, 0, 2, 3, 5, 4])
    result = score_images(truth[perm], truth, torch.arange(6)[perm], torch.arange(6))
    assert result["assignment_cost"] == "mse"
    assert result["assignment"] == torch.argsort(perm).tolist()
    assert result["lpips_mean"] is None
    assert result["lpips_median"] is None
    assert result["lpips_min"] is None
    assert all(r["lpips"] is None for r in result["per_image"])
    assert str(missing_backbone) in result["lpips_status"]
    assert result["label_accuracy"] == 1.0
    assert_no_nan(result)


def test_incomplete_backbone_names_missing_keys(shared_backbone: Path, tmp_path: Path) -> None:
    state = torch.load(shared_backbone, map_location="cpu", weights_only=True)
    del state["features.10.weight"], state["features.10.bias"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    configure(backbone_path=partial)
    with pytest.raises(LpipsUnavailable, match=r"features\.10\.bias.*features\.10\.weight"):
        get_lpips()


def test_full_alexnet_state_dict_is_accepted(shared_backbone: Path, tmp_path: Path) -> None:
    state = torch.load(shared_backbone, map_location="cpu", weights_only=True)
    state["classifier.1.weight"] = torch.zeros(4, 9216)  # as in torchvision's full AlexNet file
    full = tmp_path / "alexnet_full.pth"
    torch.save(state, full)
    configure(backbone_path=full)
    ref, p1 = load_png("ex_ref.png"), load_png("ex_p1.png")
    assert lpips_distance(ref, p1).item() == pytest.approx(0.138, abs=1e-3)


def test_no_download_when_disabled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(lpips_net, "_hub_cache_file", lambda: tmp_path / "alexnet-owt-x.pth")
    configure(allow_download=False)
    with pytest.raises(LpipsUnavailable, match=ENV_VAR):
        get_lpips()


# --------------------------------------------------------------------------- plots


@pytest.mark.parametrize(("n", "grey"), [(3, False), (20, True)])
def test_save_pair_grid_writes_png(tmp_path: Path, n: int, grey: bool) -> None:
    truth = torch.cat([real_batch(16, grey=grey)] * 4)[:n]
    rec = (truth + 0.05).clamp(0, 1)
    out = save_pair_grid(truth, rec, tmp_path / "sub" / "grid.png", title="test grid")
    assert out == tmp_path / "sub" / "grid.png"
    assert out.stat().st_size > 0
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0


def test_save_pair_grid_rejects_wrong_psnr_count(tmp_path: Path) -> None:
    truth = real_batch(16)
    with pytest.raises(ValueError, match="PSNR values"):
        save_pair_grid(truth, truth, tmp_path / "g.png", psnr=[1.0])
