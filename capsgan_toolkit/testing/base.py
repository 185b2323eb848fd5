"""The shared part of :mod:`capsgan_toolkit.testing`: the violation, failure messages, helpers, params.

Import the checks from :mod:`capsgan_toolkit.testing`; this module is its implementation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tomllib
import torch
from pydantic import BaseModel, ValidationError

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import Params

IMAGE_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 28, 28), (3, 32, 32))
"""Image shapes ``(C, H, W)`` the image checks use by default: MNIST-like grey and CIFAR-like RGB."""

BAD_IMAGE_SHAPES: tuple[tuple[int, ...], ...] = ((28, 28), (1, 0, 28), (0, 28, 28))
"""Image shapes no component can work with; building one with them must raise a CapsganError."""

BATCH = 3
"""Images per checked batch: odd, and unlike the usual class counts and capsule sizes, so a
transposed dimension cannot go unnoticed."""

_UNKNOWN_KEY = "no_such_param_capsgan_kit"


class ContractViolation(AssertionError):
    """A component breaks its family's contract.

    Attributes:
        check: the check that failed, e.g. ``"gradients"``.
        component: the component, e.g. ``"encoder my_package.MyEncoder"``.
    """

    def __init__(self, message: str, *, check: str, component: str):
        super().__init__(message)
        self.check = check
        self.component = component


# ------------------------------------------------------------------------------ helpers


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Checker:
    """Names failures: ``check_encoder: encoder pkg.Cls, image shape (1, 28, 28), check "gradients": ...``."""

    def __init__(self, function: str, family: str, cls: type):
        self.function = function
        self.component = f"{family} {_qualname(cls)}"
        self.where = ""

    def fail(self, check: str, detail: str) -> ContractViolation:
        where = f", {self.where}" if self.where else ""
        return ContractViolation(f'{self.function}: {self.component}{where}, check "{check}": {detail}',
                                 check=check, component=self.component)

    def expect(self, condition: bool, check: str, detail: str) -> None:
        if not condition:
            raise self.fail(check, detail)

    @contextlib.contextmanager
    def running(self, check: str, what: str) -> Iterator[None]:
        """Turn an exception raised while doing ``what`` into a violation of ``check``."""
        try:
            yield
        except ContractViolation:
            raise
        except Exception as exc:
            raise self.fail(check, f"{what} raised {type(exc).__name__}: {exc}") from exc


def _seed(seed: int) -> None:
    from capsgan_toolkit.recipe.build import seed_everything

    seed_everything(seed)


def _params_model(cls: type) -> type[BaseModel]:
    model = getattr(cls, "Params", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise AssertionError(f"{_qualname(cls)} has no pydantic Params model (got {model!r}); declare a nested "
                             "class Params subclassing capsgan_toolkit.interfaces.Params (or its family's base).")
    return model


def _validated(chk: _Checker, model: type[BaseModel], params: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    if isinstance(params, model):
        return params
    if isinstance(params, BaseModel):
        raise chk.fail("params", f"params is a {type(params).__name__}, not the component's own {model.__name__}")
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise chk.fail("params", f"the params given to the check do not validate: {exc}") from None


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _check_tensor(chk: _Checker, check: str, what: str, value: Any, shape: tuple[int, ...],
                  value_range: tuple[float, float] | None = None) -> torch.Tensor:
    chk.expect(isinstance(value, torch.Tensor), check, f"{what} is {_shape(value)}, not a tensor")
    chk.expect(tuple(value.shape) == tuple(shape), check, f"{what} has {_shape(value)}; the contract is {tuple(shape)}")
    chk.expect(value.is_floating_point(), check, f"{what} has dtype {value.dtype}; the contract is a float tensor")
    chk.expect(bool(torch.isfinite(value).all()), "finite", f"{what} holds NaN or Inf values")
    if value_range is not None:
        lo, hi = float(value.detach().min()), float(value.detach().max())
        chk.expect(value_range[0] <= lo and hi <= value_range[1], "range",
                   f"{what} lies in [{lo:.4g}, {hi:.4g}]; the contract is [{value_range[0]:g}, {value_range[1]:g}]")
    return value


def _random_weights(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Fixed random weights for a scalar of ``out``: unlike ``out.sum()``, not blind to normalised outputs."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)


def _check_gradients(chk: _Checker, module: torch.nn.Module, what: str) -> None:
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    chk.expect(bool(trainable), "gradients", f"{what} has no trainable parameters (nothing for an optimizer to train)")
    for name, p in trainable:
        chk.expect(p.grad is not None, "gradients",
                   f'no gradient reaches parameter "{name}" from {what}\'s output: is it used in forward, or '
                   "detached (.detach(), .item(), torch.no_grad) on the way?")
        chk.expect(bool(torch.isfinite(p.grad).all()), "gradients", f'the gradient of parameter "{name}" holds NaN or Inf')
        chk.expect(bool(p.grad.abs().sum() > 0), "gradients",
                   f'the gradient of parameter "{name}" is exactly zero: its value cannot change the output')


def _check_input_gradient(chk: _Checker, x: torch.Tensor, what: str) -> None:
    chk.expect(x.grad is not None and bool(torch.isfinite(x.grad).all()) and bool(x.grad.abs().sum() > 0),
               "gradients", f"no finite, non-zero gradient flows back to {what}; the parts before it train through it")


def _expect_raises_capsgan_error(chk: _Checker, build: Callable[[tuple], Any], bad_shapes) -> None:
    for shape in bad_shapes:
        try:
            build(tuple(shape))
        except CapsganError:
            continue
        except Exception as exc:
            raise chk.fail("error messages",
                           f"building it for the image shape {tuple(shape)} raised {type(exc).__name__}: {exc}; "
                           "the contract is a CapsganError (usually capsgan_toolkit.errors.RecipeError) of one clear "
                           "sentence: call capsgan_toolkit.layers.check_image_shape(kind, image_shape) first in "
                           "__init__") from exc
        raise chk.fail("error messages",
                       f"building it for the image shape {tuple(shape)} succeeded; the contract is a CapsganError "
                       "saying the shape is unusable (capsgan_toolkit.layers.check_image_shape raises one)")


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- params


def check_params(component: type, params: Mapping[str, Any] | BaseModel | None = None, *,
                 base: type[BaseModel] = Params, descriptions: bool = True) -> BaseModel:
    """Check a component's params model; return the validated params.

    Checks that ``component.Params`` subclasses ``base`` (``Params`` rejects unknown keys), that
    ``params`` (default: every field's default) validate, that they survive the round trips a
    run makes (``model_dump`` -> ``model_validate``; JSON by alias with ``None`` left out, as a
    run folder's recipe.toml stores them; TOML), that an unknown key is rejected, and, with
    ``descriptions``, that every field has a description (``capsgan plugins`` shows it).

    Args:
        component: the component class (its ``Params`` is checked), or a params model.
        params: a dict or a ``Params`` instance; ``None``: the defaults.
        base: the base the params model must subclass (``EncoderParams`` for encoders,
            ``DatasetParams`` for data sets).
        descriptions: require a description on every field.

    Raises:
        ContractViolation: naming the component and what is wrong.
    """
    is_model = isinstance(component, type) and issubclass(component, BaseModel)
    chk = _Checker("check_params", "params model" if is_model else "component", component)
    model = component if is_model else _params_model(component)
    chk.expect(issubclass(model, base), "params",
               f"its Params model {model.__name__} does not subclass {base.__module__}.{base.__name__}")
    p = _validated(chk, model, params)
    round_trips = {"model_dump -> model_validate": lambda: model.model_validate(p.model_dump())}

    def via_json():
        dumped = p.model_dump(mode="json", by_alias=True, exclude_none=True)
        return model.model_validate(json.loads(json.dumps(dumped)))

    def via_toml():
        from capsgan_toolkit.recipe.toml_io import dumps_toml

        dumped = p.model_dump(mode="json", by_alias=True, exclude_none=True)
        return model.model_validate(tomllib.loads(dumps_toml({"table": dumped}))["table"])

    round_trips["JSON by alias, None left out (recipe.toml of a run)"] = via_json
    round_trips["TOML"] = via_toml
    for name, trip in round_trips.items():
        with chk.running("params round trip", f"the {name} round trip"):
            again = trip()
        chk.expect(again == p, "params round trip",
                   f"the {name} round trip gives {again!r}, not the original {p!r} (a resumed or evaluated run "
                   "would build a different component)")
    try:
        model.model_validate({**p.model_dump(by_alias=True), _UNKNOWN_KEY: 1})
    except ValidationError:
        pass
    else:
        raise chk.fail("params", f'an unknown key ("{_UNKNOWN_KEY}") is accepted; a typo in a recipe must be an '
                       'error: subclass capsgan_toolkit.interfaces.Params (model_config extra="forbid")')
    if descriptions:
        for name, field in model.model_fields.items():
            chk.expect(bool(field.description), "params",
                       f'param "{field.alias or name}" has no description: add Field(..., description="...") '
                       "(capsgan plugins shows it)")
    return p
