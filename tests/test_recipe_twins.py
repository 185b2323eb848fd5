"""Shipped capsule recipes and their CNN twins differ only in the encoder.

A side-by-side of a capsule encoder and a CNN encoder is fair only when everything else
(data, budget, generator, discriminator, losses, optimizers, gate, checkpoints, outputs)
is the same; each pair below is compared key by key, after parsing, with comments ignored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1] / "recipes"

# (capsule recipe, its CNN twin)
TWINS = [
    ("quickstart.toml", "quickstart_cnn.toml"),
    ("capsgan_mnist.toml", "cnngan_mnist.toml"),
    ("capsgan_cifar.toml", "cnngan_cifar.toml"),
    ("capsgan_fashion_mnist.toml", "cnngan_fashion_mnist.toml"),
    ("capsgan_fashion_mnist_improved.toml", "cnngan_fashion_mnist_improved.toml"),
    ("capsgan_mnist_improved.toml", "cnngan_mnist_improved.toml"),
]

ALLOWED = {"run.name"}  # the run folder's name; [encoder] is meant to differ


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("capsule,cnn", TWINS, ids=[c for c, _ in TWINS])
def test_twins_differ_only_in_the_encoder(capsule, cnn):
    a = tomllib.loads((ROOT / capsule).read_text(encoding="utf-8"))
    b = tomllib.loads((ROOT / cnn).read_text(encoding="utf-8"))
    assert a["encoder"]["plugin"] == "capsnet" and b["encoder"]["plugin"] != "capsnet"
    # What the generator receives must match too, or the reconstructions are not comparable.
    assert a["encoder"].get("latent", "true_class") == b["encoder"].get("latent", "true_class")
    fa, fb = _flat({k: v for k, v in a.items() if k != "encoder"}), _flat({k: v for k, v in b.items() if k != "encoder"})
    differ = sorted(k for k in fa.keys() | fb.keys() if k not in ALLOWED and fa.get(k, "<missing>") != fb.get(k, "<missing>"))
    assert not differ, f"{capsule} and {cnn} differ outside [encoder]: " + ", ".join(
        f"{k} ({fa.get(k, '<missing>')!r} vs {fb.get(k, '<missing>')!r})" for k in differ
    )


def test_every_shipped_capsule_recipe_with_a_cnn_twin_is_listed():
    # capsgan_X.toml with a cnngan_X.toml beside it must be in TWINS.
    listed = {c for c, _ in TWINS}
    for path in ROOT.glob("capsgan_*.toml"):
        twin = ROOT / path.name.replace("capsgan_", "cnngan_", 1)
        if twin.exists():
            assert path.name in listed, f"add ({path.name!r}, {twin.name!r}) to TWINS"
