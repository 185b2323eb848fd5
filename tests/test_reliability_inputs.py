"""Every bad input gives one clear error and loses nothing: recipes, checkpoints, data, plugins.

Malformed recipes are generated with hypothesis from the tiny recipe: unknown keys,
deleted required keys, wrong types, numbers outside every declared bound (read from the
recipe's and each component's pydantic models), unknown or wrong-role plugin names, and
damaged TOML text. Each must raise a :class:`RecipeError` naming the key (in process,
for speed), and a handful go through the command line, which must exit with code 2 and
no traceback. Checkpoints are damaged in every way the loader must refuse, including a
pickle that would run code when unpickled. A corrupt image in an ``image_folder`` data
set is covered by ``tests/test_datasets.py::test_image_folder_corrupt_files``; an
existing run folder by ``tests/test_cli.py::test_existing_run_folder_is_refused_then_overwritten_on_request``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import random
import re
import sys
import typing
from collections import Counter
from pathlib import Path

import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt
from helpers import TINY_RECIPE, write_toml
from helpers import invoke as _invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from capsgan_toolkit.errors import CheckpointError, RecipeError
from capsgan_toolkit.interfaces import SLOTS as RECIPE_SLOTS
from capsgan_toolkit.plugin.manager import load_plugins
from capsgan_toolkit.recipe.schema import ComponentSpec, Recipe, resolve, resolve_file
from capsgan_toolkit.recipe.toml_io import dumps_toml
from capsgan_toolkit.rundir import checkpoint as ckpt

TESTS = Path(__file__).resolve().parent
_REGISTRY = load_plugins().registry
SLOTS = {key: family for key, family in RECIPE_SLOTS if key != "objective"}
TALLY = {"malformed recipes": 0, "of them through the command line": 0, "bad checkpoints": 0,
         "other bad inputs": 0}
EXAMPLES = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _report_tally(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write("\n")
            reporter.write_line("bad-input tally: " + ", ".join(f"{k}: {v}" for k, v in TALLY.items()))


def invoke(*args):
    return _invoke(*args, catch_exceptions=True)


def _assert_clean_exit(result, code: int = 2) -> str:
    """The command failed with ``code``, one message and no traceback; return the message."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


# ---------------------------------------------------------------------------- malformed recipes


def _get(data: dict, path: tuple):
    for part in path:
        data = data[part]
    return data


def _set(data: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _walk(data, prefix=()):
    """Yield the path of every table and value below the top level."""
    for key, value in data.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _walk(value, prefix + (key,))


def _inner(annotation):
    """``X`` for ``X`` or ``X | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _bounded_numbers() -> list[tuple[tuple, type, object]]:
    """Every int/float field with a bound, in the recipe's sections and the tiny recipe's components."""
    found = []

    def walk(model: type[BaseModel], prefix: tuple) -> None:
        for name, field in model.model_fields.items():
            kind = _inner(field.annotation)
            path = prefix + (field.alias or name,)
            if isinstance(kind, type) and issubclass(kind, BaseModel) and kind is not ComponentSpec:
                walk(kind, path)
            elif kind in (int, float):
                found.extend((path, kind, b) for b in field.metadata if isinstance(b, (Ge, Gt, Le, Lt)))

    walk(Recipe, ())
    for slot, family in SLOTS.items():
        walk(_REGISTRY.get(family, _get(TINY_RECIPE, tuple(slot.split(".")))["plugin"]).params_model,
             tuple(slot.split(".")))
    return found


BOUNDED = _bounded_numbers()
REQUIRED = [("data",), ("encoder",), ("generator",), ("losses",), ("losses", "classification")] + [
    tuple(slot.split(".")) + ("plugin",) for slot in SLOTS]
PATHS = list(_walk(TINY_RECIPE))
_junk_text = st.text("abcxyz_-", min_size=1, max_size=8).map(lambda t: "x" + t)  # never a number or bool
_junk_list = st.lists(st.integers(-5, 5), max_size=3)
_junk_table = st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(0, 9), max_size=2)


def _violates(bound, value) -> bool:
    if isinstance(bound, Ge):
        return not value >= bound.ge
    if isinstance(bound, Gt):
        return not value > bound.gt
    if isinstance(bound, Le):
        return not value <= bound.le
    return not value < bound.lt


def _outside(kind: type, bound) -> st.SearchStrategy:
    limit = getattr(bound, type(bound).__name__.lower())  # Ge(ge=1).ge, Lt(lt=1.0).lt, ...
    below = isinstance(bound, (Ge, Gt))
    if kind is int:
        values = (st.integers(max_value=math.floor(limit)) if below else st.integers(min_value=math.ceil(limit)))
    else:
        values = (st.floats(max_value=limit, min_value=limit - 1e6) if below
                  else st.floats(min_value=limit, max_value=limit + 1e6))
    return values.filter(lambda v: _violates(bound, v))


def _wrong_type(value) -> st.SearchStrategy:
    if isinstance(value, dict):
        return st.one_of(st.integers(), _junk_text, _junk_list)
    if isinstance(value, str):
        return st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), _junk_list, _junk_table)
    return st.one_of(_junk_text, _junk_list, _junk_table)  # numbers


@st.composite
def malformed_recipes(draw) -> tuple[str, dict, str]:
    """Return (what was broken, the recipe dict, text the error message must contain)."""
    data = copy.deepcopy(TINY_RECIPE)
    kind = draw(st.sampled_from(["unknown key", "missing key", "wrong type", "out of range",
                                 "unknown plugin", "wrong-role loss"]))
    if kind == "unknown key":
        tables = [()] + [p for p in PATHS if isinstance(_get(data, p), dict)]
        path = draw(st.sampled_from(tables)) + ("x_" + draw(st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True)),)
        _set(data, path, draw(st.one_of(st.integers(), _junk_text)))
        return kind, data, ".".join(path)
    if kind == "missing key":
        path = draw(st.sampled_from(REQUIRED))
        del _get(data, path[:-1])[path[-1]]
        return kind, data, ".".join(path)
    if kind == "wrong type":
        path = draw(st.sampled_from(PATHS))
        _set(data, path, draw(_wrong_type(_get(data, path))))
        return kind, data, path[0]
    if kind == "out of range":
        path, number, bound = draw(st.sampled_from(BOUNDED))
        _set(data, path, draw(_outside(number, bound)))
        return kind, data, ".".join(path)
    slot = draw(st.sampled_from(list(SLOTS)))
    path = tuple(slot.split(".")) + ("plugin",)
    if kind == "unknown plugin":
        _set(data, path, "zz" + draw(st.from_regex(r"[a-z_]{0,8}", fullmatch=True)))
        return kind, data, ".".join(path)
    role = draw(st.sampled_from(["classification", "reconstruction", "adversarial"]))
    wrong = [c.name for family in ("classification_loss", "reconstruction_loss", "adversarial_loss")
             if family != f"{role}_loss" for c in _REGISTRY.components(family)]
    _set(data, ("losses", role, "plugin"), draw(st.sampled_from(wrong)))
    return kind, data, f"losses.{role}.plugin"


@EXAMPLES
@given(malformed_recipes())
def test_every_malformed_recipe_gives_a_recipe_error_naming_the_key(case):
    kind, data, key = case
    TALLY["malformed recipes"] += 1
    with pytest.raises(RecipeError) as err:
        resolve(data, _REGISTRY, source="mutated.toml")
    message = str(err.value)
    assert message.startswith("mutated.toml: the recipe is not valid"), message
    assert key in message, (kind, message)


@EXAMPLES
@given(st.lists(malformed_recipes(), min_size=2, max_size=4))
def test_several_faults_at_once_still_give_a_recipe_error(cases):
    data = copy.deepcopy(TINY_RECIPE)
    for _, broken, _ in cases:  # graft each broken section into one recipe
        for key in broken.keys() | data.keys():
            if broken.get(key) != TINY_RECIPE.get(key):
                if key in broken:
                    data[key] = broken[key]
                else:
                    data.pop(key, None)
    TALLY["malformed recipes"] += 1
    with pytest.raises(RecipeError):
        resolve(data, _REGISTRY, source="mutated.toml")


def _damaged_toml() -> st.SearchStrategy:
    text = dumps_toml(TINY_RECIPE) + "\n"
    junk = st.text('[]{}="\'#,.\n\\ ab1\t\x00\ud800', min_size=1, max_size=6)
    position = st.integers(0, len(text))
    return st.one_of(
        st.tuples(position, junk).map(lambda pj: text[:pj[0]] + pj[1] + text[pj[0]:]),
        position.map(lambda p: text[:p]),
        st.text(max_size=80),
    )


def test_damaged_toml_gives_a_clean_error_with_line_and_column(tmp_path):
    outcomes = Counter()
    path = tmp_path / "damaged.toml"

    @EXAMPLES
    @given(_damaged_toml())
    def check(text):
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        TALLY["malformed recipes"] += 1
        try:
            resolve_file(path, _REGISTRY)
        except RecipeError as exc:
            message = str(exc)
            assert message.startswith(str(path)), message
            if "not valid TOML" in message:
                assert re.search(r"line \d+, column \d+", message), message
                outcomes["syntax"] += 1
            else:
                outcomes["other"] += 1
        else:
            outcomes["valid"] += 1  # junk can land in a comment or a string

    check()
    assert outcomes["syntax"] >= 50 and outcomes["other"] >= 5, outcomes


def test_malformed_recipes_through_the_command_line_exit_2_without_traceback(tmp_path):
    seen = Counter()

    @settings(max_examples=12, deadline=None, derandomize=True, database=None)
    @given(malformed_recipes())
    def check(case):
        kind, data, _ = case
        path = write_toml(tmp_path / "bad.toml", data)
        command = "run" if seen[kind] == 0 else "validate"  # the first of each kind through `run`
        seen[kind] += 1
        result = invoke(command, path, *(["--out", tmp_path / "out", "--quiet"] if command == "run" else []))
        assert "error:" in _assert_clean_exit(result)
        assert not (tmp_path / "out").exists()
        TALLY["malformed recipes"] += 1
        TALLY["of them through the command line"] += 1

    check()
    assert len(seen) >= 4, seen


def test_toml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[run]\nname = "x"\nepochs = = 3\n', encoding="utf-8")
    message = _assert_clean_exit(invoke("validate", path))
    assert str(path) in message and "not valid TOML" in message and "line 3, column" in message
    TALLY["other bad inputs"] += 1


# ---------------------------------------------------------------------------- plugins and data


@pytest.mark.parametrize("module, expected", [
    ("plugins_for_tests.broken_import", "capsgan-missing-dependency"),
    ("no_such_plugin_module", "No module named 'no_such_plugin_module'"),
])
def test_recipe_naming_a_missing_or_broken_plugin_module_is_refused(monkeypatch, tmp_path, module, expected):
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["plugins"] = [module]
    message = _assert_clean_exit(invoke("validate", write_toml(tmp_path / "r.toml", recipe)))
    assert f'plugin module "{module}"' in message and expected in message
    TALLY["other bad inputs"] += 1


def test_plugin_whose_registration_fails_is_reported_and_the_rest_works(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["plugins"] = ["plugins_for_tests.broken_register"]
    result = invoke("validate", write_toml(tmp_path / "r.toml", recipe))
    assert result.exit_code == 0, result.output
    assert "registration failed on purpose" in result.output and "warning" in result.output
    TALLY["other bad inputs"] += 1


def test_missing_data_set_fails_before_training_and_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPSGAN_DATA", raising=False)
    empty = tmp_path / "no-data"
    empty.mkdir()
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"] = {"plugin": "mnist", "root": str(empty), "download": False, "batch_size": 8}
    path = write_toml(tmp_path / "mnist.toml", recipe)
    for _ in range(2):  # the same command fails the same way: no half-made folder is left to refuse it
        message = _assert_clean_exit(invoke("run", path, "--out", tmp_path / "run", "--quiet"))
        assert str(empty) in message and "data.download" in message
        assert not (tmp_path / "run").exists()
    TALLY["other bad inputs"] += 1


# ---------------------------------------------------------------------------- run folders


def test_resume_needs_a_run_folder_and_contradicting_flags_are_refused(tmp_path):
    message = _assert_clean_exit(invoke("run", "--resume", tmp_path / "absent"))
    assert "no such run folder" in message
    (tmp_path / "empty").mkdir()
    message = _assert_clean_exit(invoke("run", "--resume", tmp_path / "empty"))
    assert "not a run folder" in message
    message = _assert_clean_exit(invoke("run", "x.toml", "--resume", tmp_path / "empty", "--overwrite"))
    assert "contradict" in message
    TALLY["other bad inputs"] += 3


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plugins):
    """A real checkpoint of the tiny recipe (built, not trained: the contents are what matter)."""
    from capsgan_toolkit.training.trainer import Trainer

    resolved = resolve(copy.deepcopy(TINY_RECIPE), plugins.registry, source="tiny.toml")
    run_dir = tmp_path_factory.mktemp("ckpt")
    return Trainer(resolved, plugins, run_dir).save("step_000000003.pt")


def _with_header(payload: bytes, magic: bytes = ckpt.MAGIC) -> bytes:
    return magic + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and all(f in message for f in fragments), message
    TALLY["bad checkpoints"] += 1
    return message


def test_flipped_bytes_anywhere_are_detected(trained, tmp_path):
    raw = trained.read_bytes()
    rng = random.Random(0)
    positions = [0, len(ckpt.MAGIC) + 3, len(ckpt.MAGIC) + 70] + [rng.randrange(len(ckpt.MAGIC) + 65, len(raw))
                                                                  for _ in range(12)]
    for i, pos in enumerate(positions):
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(damaged))
        message = _refused(path)
        if pos >= len(ckpt.MAGIC):
            assert "corrupt or truncated" in message


@pytest.mark.parametrize("keep", [0, 5, len(ckpt.MAGIC), len(ckpt.MAGIC) + 30, 1000, -1])
def test_truncated_checkpoint_is_refused(trained, tmp_path, keep):
    raw = trained.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: keep if keep >= 0 else len(raw) - 1])
    _refused(path, "truncated")


def test_foreign_and_garbage_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"weight": torch.ones(2)}}, foreign)
    _refused(foreign, "not a capsgan checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(_with_header(b"not a torch file at all"))
    _refused(garbage, "could not be read as a checkpoint")
    _refused(tmp_path / "absent.pt", "does not exist")


class _RunsCode:
    """Unpickling this object runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'echo pwned > "{self.marker}"',)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell")
def test_checkpoint_that_would_run_code_is_refused_with_a_valid_checksum(tmp_path):
    marker = tmp_path / "pwned.txt"
    buffer = io.BytesIO()
    torch.save({"format": ckpt.FORMAT_VERSION, "models": {}, "payload": _RunsCode(marker)}, buffer)
    payload = buffer.getvalue()
    torch.load(io.BytesIO(payload), weights_only=False)  # the payload is real: a plain load runs it
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pt"
    path.write_bytes(_with_header(payload))  # a valid header and checksum: only weights_only stands guard
    _refused(path, "refused", "posix.system" if os.name == "posix" else "system", "could run code")
    assert not marker.exists()


def test_other_format_versions_are_refused_naming_both_versions(tmp_path):
    path = ckpt.save_checkpoint({"format": 2, "toolkit_version": "9.9.9"}, tmp_path / "newer.pt")
    _refused(path, "format 2", "capsgan-toolkit 9.9.9", f"reads format {ckpt.FORMAT_VERSION}")
    buffer = io.BytesIO()
    torch.save({"format": 2}, buffer)
    path = tmp_path / "newer_header.pt"
    path.write_bytes(_with_header(buffer.getvalue(), magic=b"CAPSGAN-CKPT 2\n"))
    _refused(path, "file format 2", f"reads format {ckpt.FORMAT_VERSION}")


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["encoder"].update(channels=16), "does not fit the models of this recipe"),
    (lambda r: (r.pop("discriminator"), r["losses"].pop("adversarial")), "holds models"),
])
def test_checkpoint_from_another_recipe_is_refused(trained, plugins, tmp_path, change, expected):
    from capsgan_toolkit.training.trainer import Trainer

    recipe = copy.deepcopy(TINY_RECIPE)
    change(recipe)
    resolved = resolve(recipe, plugins.registry, source="other.toml")
    with pytest.raises(CheckpointError, match="another recipe") as err:
        Trainer(resolved, plugins, tmp_path, resume_from=trained)
    assert expected in str(err.value) and str(trained) in str(err.value)
    TALLY["bad checkpoints"] += 1


def test_resuming_from_a_corrupt_checkpoint_says_so_on_the_command_line(trained, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    write_toml(run_dir / "recipe.toml", TINY_RECIPE)
    raw = bytearray(trained.read_bytes())
    raw[-10] ^= 0xFF
    (run_dir / "checkpoints" / "step_000000003.pt").write_bytes(bytes(raw))
    message = _assert_clean_exit(invoke("run", "--resume", run_dir, "--quiet"))
    assert "corrupt or truncated" in message and "step_000000003.pt" in message
    TALLY["bad checkpoints"] += 1


def test_a_finished_run_with_a_corrupt_final_checkpoint_is_not_called_done(trained, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    write_toml(run_dir / "recipe.toml", TINY_RECIPE)
    (run_dir / "summary.json").write_text('{"steps": 6}', encoding="utf-8")
    raw = trained.read_bytes()
    (run_dir / "checkpoints" / "best.pt").write_bytes(raw)
    damaged = bytearray(raw)
    damaged[-10] ^= 0xFF
    (run_dir / "checkpoints" / "final.pt").write_bytes(bytes(damaged))
    # --resume of the finished run: not "done", the damage named, the other checkpoint and --overwrite offered.
    message = _assert_clean_exit(invoke("run", "--resume", run_dir, "--quiet"))
    assert "finished training" in message and "corrupt or truncated" in message and "final.pt" in message
    assert "best.pt" in message and "--checkpoint" in message and "--overwrite" in message
    # eval of it: the same, pointing at the checkpoint that still reads.
    message = _assert_clean_exit(invoke("eval", run_dir, "--metrics", "acc"))
    assert "corrupt or truncated" in message and "--checkpoint best.pt" in message
    assert (run_dir / "checkpoints" / "final.pt").read_bytes() == bytes(damaged)  # nothing rewritten
    TALLY["bad checkpoints"] += 2
