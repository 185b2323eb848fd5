"""How many optimizer steps the quickstart's encoder + generator need to reconstruct, as a plain autoencoder.

Trains a recipe's encoder and generator on the recipe's training split with the pixel MSE
alone (no classification loss, no discriminator, no gate; ``--margin`` adds the recipe's
classification loss), Adam at the recipe's encoder_generator learning rate and betas with its
warm-up and cosine schedule over ``--steps`` steps, batches of ``data.batch_size`` drawn at
random. Prints the training MSE along the way, then the test MSE (in [0, 1] pixel units, as
``capsgan eval`` reports ``rec_mse``) of the first 500 test images, and writes a picture of
8 test images above their reconstructions. It answers whether a short run's blurred
reconstructions come from the training objective (the classification loss, the adversarial
term, the gate) or from the encoder/generator pair's own learning speed
(docs/capsules.md, "What limits the quickstart's reconstructions").

Usage::

    python benchmarks/decoder_steps.py recipes/quickstart.toml --steps 560
    python benchmarks/decoder_steps.py recipes/quickstart.toml --steps 1680 --out /tmp/ae1680.png
    python benchmarks/decoder_steps.py recipes/quickstart_cnn.toml --set data.channels=1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from capsgan_toolkit.evaluation.scores import ssim
from capsgan_toolkit.step.optim import lr_multiplier
from capsgan_toolkit.tools.bench import build_for_bench


class _Project(nn.Module):
    """Latent -> (channels, side, side) maps: a linear layer, BatchNorm and ReLU (the DCGAN generator's first layer)."""

    def __init__(self, latent: int, channels: int, side: int):
        super().__init__()
        self.linear = nn.Linear(latent, channels * side * side, bias=False)
        self.norm, self.shape = nn.BatchNorm2d(channels), (channels, side, side)

    def forward(self, z):
        return F.relu(self.norm(self.linear(z.flatten(1)).view(-1, *self.shape)))


def _up(cin, cout, transposed):
    if transposed:
        return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
    return [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


# Other decoders of a 32 x 32 image from the latent, for --decoder (base width 32, as the quickstart's generator).
DECODERS = {
    "recipe": None,
    # Sabour et al.'s decoder: fully connected layers, sigmoid there, tanh here.
    "mlp": lambda z, c, s: nn.Sequential(nn.Flatten(), nn.Linear(z, 512), nn.ReLU(True), nn.Linear(512, 1024),
                                         nn.ReLU(True), nn.Linear(1024, c * s * s), nn.Tanh(), nn.Unflatten(1, (c, s, s))),
    # the DCGAN generator's layers, projected to 8 x 8 instead of 4 x 4 (one upsampling fewer)
    "project8": lambda z, c, s: nn.Sequential(_Project(z, 64, s // 4), *_up(64, 32, True),
                                              nn.ConvTranspose2d(32, c, 4, 2, 1), nn.Tanh()),
    # nearest-neighbour upsampling + 3 x 3 convolutions instead of transposed convolutions
    "upsample": lambda z, c, s: nn.Sequential(_Project(z, 128, s // 8), *_up(128, 64, False), *_up(64, 32, False),
                                              *_up(32, 16, False), nn.Conv2d(16, c, 3, 1, 1), nn.Tanh()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=560)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--margin", action="store_true", help="add the recipe's classification loss")
    parser.add_argument("--out", default="decoder_steps.png", help="picture: test images above reconstructions")
    parser.add_argument("--decoder", choices=sorted(DECODERS), default="recipe",
                        help="the recipe's generator, or another decoder of the same latent (seeded with 0)")
    args = parser.parse_args()
    built, resolved = build_for_bench(args.recipe, args.sets)
    parts, spec = built.parts, resolved.optim["encoder_generator"]
    enc, gen = parts.encoder, parts.generator
    train, test = built.dataset.split("train"), built.dataset.split("test")
    images, labels = train.images.float() / 127.5 - 1, train.labels
    if args.decoder != "recipe":
        torch.manual_seed(0)
        gen = DECODERS[args.decoder](enc.num_classes * enc.capsule_dim, images.shape[1], images.shape[-1])
    test_images, test_labels = test.images[:500].float() / 127.5 - 1, test.labels[:500]
    params = list(enc.parameters()) + list(gen.parameters())
    opt = torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(spec, step, args.steps))
    draw, batch = torch.Generator().manual_seed(resolved.recipe.run.seed), resolved.recipe.data.batch_size
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (batch,), generator=draw)
        x, y = images[idx], labels[idx]
        capsules = enc(x)
        rec = gen(enc.to_latent(capsules, y))
        mse = F.mse_loss(rec, x)
        loss = mse + parts.classification(capsules, y) if args.margin else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(args.steps // 4, 1) == 0 or step == args.steps - 1:
            print(f"step {step + 1:5d}  train MSE {mse.item() / 4:.4f}", flush=True)
    enc.eval(), gen.eval()
    with torch.no_grad():
        capsules = enc(test_images)
        rec = gen(enc.to_latent(capsules, test_labels))
    what = "MSE + classification" if args.margin else "MSE only"
    print(f"{args.recipe} {' '.join(args.sets)} (decoder {args.decoder}, {what}, {args.steps} steps of {batch}): "
          f"test MSE {F.mse_loss(rec, test_images).item() / 4:.4f}, SSIM {ssim(rec, test_images).mean().item():.3f} "
          f"on {len(test_images)} images; {time.perf_counter() - start:.0f} s")
    save_image(torch.cat([test_images[:8], rec[:8]]) * 0.5 + 0.5, args.out, nrow=8)
    print(f"picture: {args.out}")


if __name__ == "__main__":
    main()
