"""The domain classifier as a judge: its blur, noise and shift augmentation, its recorded blur accuracy, its cache key."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.ndimage
import torch

from capsgan_plugins import metric_features as mf

CPU = torch.device("cpu")
SMALL = {"epochs": 1, "channels": 4, "feature_dim": 8, "batch_size": 16, "max_train_images": 64}


def _glyphs(registry, **params):
    return registry.create("dataset", "glyphs", {"image_size": 28, "channels": 1, "num_train": 64, "num_test": 48,
                                                 "batch_size": 8, **params})


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_blur_is_scipys_gaussian_filter(sigma):
    """sigma means pixels: torchvision's blur equals scipy.ndimage's (three sigmas each side, mirrored borders)."""
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    reference = scipy.ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=3.0)
    assert np.abs(mf.blur_images(images, sigma).numpy() - reference).max() < 1e-9
    as_u8 = mf.blur_images(images.round().to(torch.uint8), sigma)
    rounded = scipy.ndimage.gaussian_filter(images.round().numpy(), sigma=(0, 0, sigma, sigma), mode="mirror",
                                            truncate=3.0)
    assert as_u8.dtype == torch.uint8 and np.abs(as_u8.numpy() - rounded).max() <= 0.5 + 1e-3  # float32 inside
    assert torch.equal(mf.blur_images(as_u8, 0.0), as_u8)


def test_augmentation_is_seeded_and_shifts_blurs_and_adds_noise(monkeypatch):
    images = (torch.rand(24, 1, 20, 20, generator=torch.Generator().manual_seed(1)) * 255).round().expand(-1, 3, -1, -1)

    def run(seed, channels=1):
        return mf.augment_batch(images.clone(), torch.Generator().manual_seed(seed), channels=channels)

    first = run(0)
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))
    assert first.min() >= 0 and first.max() <= 255 and torch.equal(first, first.round())
    assert torch.equal(first[:, 0], first[:, 1]) and torch.equal(first[:, 0], first[:, 2]), "grey images stay grey"
    assert not torch.equal(run(0, channels=3)[:, 0], run(0, channels=3)[:, 1])

    # Blur only: every group is the image blurred with the one sigma allowed.
    monkeypatch.setattr(mf, "AUGMENTATION", mf.JudgeAugmentation(shift_px=0, blur_share=1.0,
                                                                  blur_sigma_px=(1.5, 1.5), noise_std_max=0.0))
    reference = scipy.ndimage.gaussian_filter(images.double().numpy(), sigma=(0, 0, 1.5, 1.5), mode="mirror",
                                              truncate=3.0)
    assert np.abs(run(0).double().numpy() - reference).max() <= 0.5 + 1e-3

    # Shift only: each group of 8 is one of the 25 translations by up to 2 pixels, border pixels repeated.
    monkeypatch.setattr(mf, "AUGMENTATION", mf.JudgeAugmentation(blur_share=0.0, noise_std_max=0.0))
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    shifted = run(3).numpy()
    seen = set()
    for start in range(0, 24, 8):
        moves = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(shifted[start:start + 8], padded[start:start + 8, :, dy:dy + 20, dx:dx + 20])]
        assert len(moves) == 1, f"group at {start} is no single shift"
        seen.add(moves[0])
    assert seen != {(2, 2)}, "nothing moved"

    # Noise only: zero-mean, per-image std at most noise_std_max.
    monkeypatch.setattr(mf, "AUGMENTATION", mf.JudgeAugmentation(shift_px=0, blur_share=0.0, noise_std_max=10.0))
    flat = torch.full((64, 3, 20, 20), 128.0)
    noise = mf.augment_batch(flat, torch.Generator().manual_seed(0)) - 128
    stds = noise.std(dim=(1, 2, 3))
    assert abs(noise.mean().item()) < 0.2 and stds.max() < 10.5 and stds.min() < 3 < stds.max()


def test_judge_training_is_deterministic_augmented_and_records_blur_accuracy(registry, tmp_path, monkeypatch):
    data = _glyphs(registry)

    def prepare(folder, **params):
        extractor = registry.create("metric_features", "domain_classifier", {**SMALL, **params}, info=data.info)
        return extractor.prepare(data, data_id="judge-test", cache_dir=tmp_path / folder, device=CPU)

    setup = prepare("a")
    assert prepare("b").identity == setup.identity, "the same data, params and seed gave other weights"
    assert prepare("c", seed=1).identity != setup.identity

    payload = torch.load(next((tmp_path / "a" / "metric_features").glob("*.pt")), weights_only=True)
    meta = payload["meta"]
    assert meta["version"] == mf.DOMAIN_CACHE_VERSION == 2
    assert meta["augmentation"]["blur_sigma_px"] == [0.5, 2.5] and meta["augmentation"]["blur_share"] == 0.5
    assert set(meta["test_accuracy_blurred"]) == {"sigma1", "sigma2"}
    assert meta["passes_per_epoch"] == 25 and "of 100 steps" in meta["schedule"]  # 64 images, batch 16: 4 steps

    # The recorded accuracies, recomputed by hand on the same 48 test images, blurred as scipy blurs.
    test = torch.stack([data.split("test")[i][0] for i in range(48)])
    labels = torch.tensor([data.split("test")[i][1] for i in range(48)])
    u8 = ((test.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    for sigma, recorded in ((0, meta["test_accuracy"]), (1, meta["test_accuracy_blurred"]["sigma1"]),
                            (2, meta["test_accuracy_blurred"]["sigma2"])):
        blurred = u8 if sigma == 0 else torch.from_numpy(np.round(scipy.ndimage.gaussian_filter(
            u8.double().numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=3.0))).to(torch.uint8)
        hand = sum(int(setup.classifier(blurred[i:i + 1]).argmax(1).item() == labels[i]) for i in range(48)) / 48
        assert recorded == pytest.approx(hand, abs=1 / 48 + 1e-9), sigma  # one image may round differently
    assert meta["test_images"] == 48
    assert (f"held-out accuracy {meta['test_accuracy']:.3f} (blurred with sigma 1 / 2 px: "
            f"{meta['test_accuracy_blurred']['sigma1']:.3f} / {meta['test_accuracy_blurred']['sigma2']:.3f}) "
            "on 48 test images") in setup.description

    # The batches really are augmented: without it, the same seed trains other weights.
    monkeypatch.setattr(mf, "augment_batch", lambda images, generator, channels=3: images)
    assert prepare("plain").identity != setup.identity


def test_cache_key_names_the_version_so_old_judges_are_not_reused(registry, tmp_path, monkeypatch):
    data = _glyphs(registry)
    extractor = registry.create("metric_features", "domain_classifier", SMALL, info=data.info)
    old_key = json.dumps({"format": 1, "data": "judge-test", "params": extractor.params.model_dump(),
                          "classes": 10, "shape": [1, 28, 28], "device": "cpu"}, sort_keys=True)
    old = tmp_path / "metric_features" / f"domain_classifier-{hashlib.sha256(old_key.encode()).hexdigest()[:16]}.pt"
    new = mf.domain_cache_path(tmp_path, data_id="judge-test", params=extractor.params, info=data.info, device=CPU)
    assert new.parent == old.parent and new != old
    old.parent.mkdir(parents=True)
    old.write_bytes(b"a judge trained on clean images only")  # unreadable: reusing it would fail loudly
    logs: list[str] = []
    extractor.prepare(data, data_id="judge-test", cache_dir=tmp_path, device=CPU, log=logs.append)
    assert new.is_file() and any("Training the domain classifier" in line for line in logs)

    monkeypatch.setattr(mf, "DOMAIN_CACHE_VERSION", 3)
    assert mf.domain_cache_path(tmp_path, data_id="judge-test", params=extractor.params, info=data.info,
                                device=CPU) != new
    monkeypatch.setattr(mf, "DOMAIN_CACHE_VERSION", 2)
    monkeypatch.setattr(mf, "AUGMENTATION", mf.JudgeAugmentation(blur_share=0.25))
    assert mf.domain_cache_path(tmp_path, data_id="judge-test", params=extractor.params, info=data.info,
                                device=CPU) != new
