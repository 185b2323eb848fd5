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
from torchvision.utils import save_image

from capsgan_toolkit.bench import build_for_bench
from capsgan_toolkit.optim import lr_multiplier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=560)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--margin", action="store_true", help="add the recipe's classification loss")
    parser.add_argument("--out", default="decoder_steps.png", help="picture: test images above reconstructions")
    args = parser.parse_args()
    built, resolved = build_for_bench(args.recipe, args.sets)
    parts, spec = built.parts, resolved.optim["encoder_generator"]
    enc, gen = parts.encoder, parts.generator
    train, test = built.dataset.split("train"), built.dataset.split("test")
    images, labels = train.images.float() / 127.5 - 1, train.labels
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
    print(f"{args.recipe} {' '.join(args.sets)} ({what}, {args.steps} steps of {batch}): test MSE "
          f"{F.mse_loss(rec, test_images).item() / 4:.4f} on {len(test_images)} images; "
          f"{time.perf_counter() - start:.0f} s")
    save_image(torch.cat([test_images[:8], rec[:8]]) * 0.5 + 0.5, args.out, nrow=8)
    print(f"picture: {args.out}")


if __name__ == "__main__":
    main()
