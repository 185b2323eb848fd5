"""Data augmentation (``[augment]``): each operation against a plain loop, seeding, the crop's
data side, recipe errors, and exact resume of an augmented run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tomllib
import torch
from helpers import TINY_RECIPE, write_toml

from capsgan_toolkit import api
from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.evaluation.evaluator import data_id
from capsgan_toolkit.interfaces import DatasetInfo, DatasetPlugin
from capsgan_toolkit.recipe.build import build
from capsgan_toolkit.recipe.schema import resolve, resolve_file
from capsgan_toolkit.rundir import checkpoint as ckpt
from capsgan_toolkit.step.augment import Augmenter, AugmentSection, Draw, apply, draw, step_generator, wrap_dataset
from capsgan_toolkit.training.monitor import Monitor
from capsgan_toolkit.training.state import DataPlan

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b=5, c=2, h=7, w=6, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- plain-loop references


def _reflect(k: int, n: int) -> int:
    return -k if k < 0 else (2 * n - 2 - k if k >= n else k)


def _ref_translate(x, dy, dx, mode):
    b, c, h, w = x.shape
    out = torch.full_like(x, -1.0)  # black: pixel value 0 in the engine's [-1, 1]
    for n in range(b):
        for i in range(h):
            for j in range(w):
                si, sj = i - int(dy[n]), j - int(dx[n])
                if mode == "reflect":
                    out[n, :, i, j] = x[n, :, _reflect(si, h), _reflect(sj, w)]
                elif 0 <= si < h and 0 <= sj < w:
                    out[n, :, i, j] = x[n, :, si, sj]
    return out


def _ref_crop(x, top, left, s):
    return torch.stack([x[n, :, int(top[n]):int(top[n]) + s, int(left[n]):int(left[n]) + s] for n in range(len(x))])


def _ref_flip(x, flip):
    out = x.clone()
    for n in range(len(x)):
        if flip[n]:
            for j in range(x.shape[-1]):
                out[n, :, :, j] = x[n, :, :, x.shape[-1] - 1 - j]
    return out


@pytest.mark.parametrize("key,mode", [("shift", "zeros"), ("crop_padding", "zeros"), ("crop_padding", "reflect")])
def test_translation_matches_a_plain_loop(key, mode):
    spec = AugmentSection(**{key: 3}, padding_mode=mode)
    x = _batch()
    dy, dx = torch.tensor([-3, -1, 0, 2, 3]), torch.tensor([3, 0, -2, -3, 1])
    got = apply(x, Draw(dy=dy, dx=dx), spec)
    assert torch.equal(got, _ref_translate(x, dy, dx, mode))


def test_a_shift_moves_content_down_and_right_and_fills_with_black():
    x = torch.zeros(1, 1, 5, 5)  # mid-grey in [-1, 1]
    x[0, 0, 1, 1] = 1.0
    got = apply(x, Draw(dy=torch.tensor([2]), dx=torch.tensor([-1])), AugmentSection(shift=2))
    assert got[0, 0, 3, 0] == 1.0
    assert (got[0, 0, :2] == -1).all() and (got[0, 0, :, 4] == -1).all()  # the rows and column shifted in
    assert got[0, 0, 2:, :4].sum() == 1.0  # the rest: the grey image, moved


def test_crop_and_flip_match_a_plain_loop():
    x = _batch(h=8, w=8)
    top, left = torch.tensor([0, 3, 1, 2, 3]), torch.tensor([3, 0, 2, 1, 0])
    assert torch.equal(apply(x, Draw(top=top, left=left), AugmentSection(crop=5)), _ref_crop(x, top, left, 5))
    flip = torch.tensor([True, False, True, True, False])
    assert torch.equal(apply(x, Draw(flip=flip), AugmentSection(hflip=True)), _ref_flip(x, flip))


def test_all_options_compose_as_crop_then_translate_then_flip():
    spec = AugmentSection(crop=6, crop_padding=2, padding_mode="reflect", hflip=True)
    x = _batch(b=6, h=9, w=8)
    choices = draw(spec, 6, (9, 8), step_generator(0, 7))
    expected = _ref_flip(_ref_translate(_ref_crop(x, choices.top, choices.left, 6), choices.dy, choices.dx, "reflect"),
                         choices.flip)
    got = Augmenter(spec, seed=0)(x, step=7)
    assert got.shape == (6, 2, 6, 6) and torch.equal(got, expected)


def test_draws_cover_the_whole_range_and_flip_about_half():
    spec = AugmentSection(shift=2, hflip=True, crop=5)
    draws = [draw(spec, 64, (8, 7), step_generator(3, s)) for s in range(20)]
    dy = torch.cat([d.dy for d in draws])
    assert set(dy.tolist()) == {-2, -1, 0, 1, 2}
    assert set(torch.cat([d.top for d in draws]).tolist()) == {0, 1, 2, 3}
    assert set(torch.cat([d.left for d in draws]).tolist()) == {0, 1, 2}
    assert 0.4 < torch.cat([d.flip for d in draws]).float().mean() < 0.6


# --------------------------------------------------------------------------- seeding


def test_the_same_seed_and_step_give_the_same_batch_and_other_steps_or_seeds_differ():
    spec = AugmentSection(shift=2, hflip=True)
    x = _batch(b=16, h=10, w=10)
    a = Augmenter(spec, seed=1)
    assert torch.equal(a(x, 5), Augmenter(spec, seed=1)(x, 5))
    assert not torch.equal(a(x, 5), a(x, 6))
    assert not torch.equal(a(x, 5), Augmenter(spec, seed=2)(x, 5))
    assert torch.equal(x, _batch(b=16, h=10, w=10))  # the input is left as it was


def test_each_rank_of_a_distributed_run_augments_its_shard_independently():
    spec, x = AugmentSection(shift=2, hflip=True), _batch(b=16, h=10, w=10)
    assert torch.equal(Augmenter(spec, seed=1, rank=0)(x, 5), Augmenter(spec, seed=1)(x, 5))
    assert not torch.equal(Augmenter(spec, seed=1, rank=1)(x, 5), Augmenter(spec, seed=1)(x, 5))


def test_augmentation_draws_nothing_from_the_global_rng():
    state = torch.get_rng_state()
    Augmenter(AugmentSection(shift=2, hflip=True, crop=8), seed=0)(_batch(h=10, w=10), 3)
    assert torch.equal(state, torch.get_rng_state())


def test_no_table_or_all_options_off_is_the_identity():
    x = _batch()
    assert Augmenter(None, seed=0)(x, 3) is x
    assert Augmenter(AugmentSection(), seed=0)(x, 3) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_same_augmentation_as_cpu():
    spec = AugmentSection(crop=6, crop_padding=2, padding_mode="reflect", hflip=True)
    x = _batch(b=32, h=8, w=8)
    got = Augmenter(spec, seed=0)(x.cuda(), 11)
    assert got.is_cuda and torch.equal(got.cpu(), Augmenter(spec, seed=0)(x, 11))


# --------------------------------------------------------------------------- recipes and the data side


def _recipe(tiny_recipe, **augment):
    tiny_recipe["augment"] = augment
    return tiny_recipe


def _recipe_error(data, registry, tmp_path):
    path = write_toml(tmp_path / "r.toml", data)
    with pytest.raises(RecipeError) as info:
        resolve_file(path, registry)
    return str(info.value)


def test_recipe_errors_name_the_key(tiny_recipe, registry, tmp_path):
    text = _recipe_error(_recipe(tiny_recipe, shift=-1, flip=True), registry, tmp_path)
    assert "augment.shift" in text and "augment.flip: unknown key" in text
    text = _recipe_error(_recipe(tiny_recipe, shift=2, crop_padding=4), registry, tmp_path)
    assert "augment.crop_padding: shift and crop_padding both translate" in text
    text = _recipe_error(_recipe(tiny_recipe, shift=2, padding_mode="reflect"), registry, tmp_path)
    assert "augment.padding_mode" in text


@pytest.mark.parametrize("augment,key", [({"crop": 29}, "augment.crop"), ({"shift": 28}, "augment.shift"),
                                         ({"crop": 10, "crop_padding": 10}, "augment.crop_padding")])
def test_options_that_do_not_fit_the_images_fail_before_training(tiny_recipe, plugins, augment, key):
    resolved = resolve(_recipe(tiny_recipe, **augment), plugins.registry, source="r.toml")
    with pytest.raises(RecipeError) as info:
        build(resolved, plugins)
    text = str(info.value)
    assert text.startswith("r.toml:") and f"  - {key}: " in text and "(1, 28, 28)" in text


def test_the_table_is_written_back_and_absent_by_default(tiny_recipe, registry):
    assert "augment" not in resolve(tiny_recipe, registry).to_dict()  # older runs keep their digest
    data = resolve(_recipe(tiny_recipe, shift=2), registry).to_dict()
    assert data["augment"] == {"shift": 2, "crop_padding": 0, "padding_mode": "zeros", "hflip": False, "crop": 0}


def test_crop_builds_the_models_for_the_crop_and_trains_on_full_images(tiny_recipe, plugins):
    resolved = resolve(_recipe(tiny_recipe, crop=24), plugins.registry)
    built = build(resolved, plugins)
    assert built.info.image_shape == (1, 24, 24)
    plan = DataPlan.make(built, resolved)
    assert plan.train_set[0][0].shape == (1, 28, 28)  # random 24x24 windows are cut per step
    assert plan.val_set[0][0].shape == plan.test_set[0][0].shape == (1, 24, 24)
    full = built.dataset.uncropped.split("test")[0][0]
    assert torch.equal(plan.test_set[0][0], full[:, 2:26, 2:26])  # the centre window
    assert plan.val_set.dataset.labels is not None  # labels stay readable without decoding images


def test_the_crop_changes_the_data_identity_that_keys_reference_feature_caches(registry):
    plain = data_id(resolve(copy.deepcopy(TINY_RECIPE), registry))
    assert data_id(resolve(_recipe(copy.deepcopy(TINY_RECIPE), shift=2, hflip=True), registry)) == plain  # train batches only
    assert data_id(resolve(_recipe(copy.deepcopy(TINY_RECIPE), crop=24), registry)) != plain  # every split is cropped


def test_a_split_that_is_not_an_image_tensor_is_cropped_item_by_item():
    class Plain(torch.utils.data.Dataset):
        labels = torch.tensor([0, 1])

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.arange(36.0).reshape(1, 6, 6) + i, i

    class Data(DatasetPlugin):
        info = DatasetInfo(num_classes=2, image_shape=(1, 6, 6))

        def split(self, name):
            return Plain()

    cropped = wrap_dataset(Data(None), AugmentSection(crop=4), "r.toml")
    assert cropped.info.image_shape == (1, 4, 4)
    split = cropped.split("test")
    image, label = split[1]
    assert torch.equal(image, (torch.arange(36.0).reshape(1, 6, 6) + 1)[:, 1:5, 1:5]) and label == 1
    assert torch.equal(split.labels, Plain.labels)


# --------------------------------------------------------------------------- exact resume


def test_two_epochs_straight_equal_one_plus_a_resume_with_augmentation_on(tiny_recipe, tmp_path, monkeypatch):
    recipe = write_toml(tmp_path / "r.toml", _recipe(tiny_recipe, crop=24, shift=2, hflip=True))
    seen = []
    call = Augmenter.__call__

    def spy(self, images, step):
        out = call(self, images, step)
        seen.append((step, tuple(images.shape), tuple(out.shape)))
        return out

    monkeypatch.setattr(Augmenter, "__call__", spy)
    monkeypatch.setattr(Monitor, "plot", lambda self: None)  # the curves take most of the time, and change nothing
    api.train(recipe, out=tmp_path / "straight")
    assert seen == [(s, (8, 1, 28, 28), (8, 1, 24, 24)) for s in range(6)]  # training batches only
    api.train(recipe, out=tmp_path / "resumed", sets=["run.epochs=1"])
    api.train(out=tmp_path / "resumed", resume=True, sets=["run.epochs=2"])
    assert [s for s, *_ in seen[6:]] == list(range(6))
    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "final.pt")
    for name, weights in a["models"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["models"][name][key]), (name, key)


# --------------------------------------------------------------------------- shipped recipes


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("capsule,cnn", [("capsgan_mnist", "cnngan_mnist"), ("capsgan_cifar", "cnngan_cifar")])
def test_report_recipes_and_their_cnn_twins_augment_alike(capsule, cnn):
    a, b = (tomllib.loads((ROOT / "recipes" / f"{name}.toml").read_text()) for name in (capsule, cnn))
    assert a["augment"] == b["augment"]
    assert a["augment"] == ({"shift": 2} if "mnist" in capsule else
                            {"crop_padding": 4, "padding_mode": "reflect", "hflip": True})


def test_the_cifar_recipes_take_the_papers_24x24_crops_as_their_comment_says(registry):
    resolved = resolve_file(ROOT / "recipes" / "capsgan_cifar.toml", registry,
                           ["augment.crop=24", "augment.crop_padding=0"])
    assert resolved.recipe.augment.crop == 24 and resolved.recipe.augment.hflip
