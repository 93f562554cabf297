"""Reading ``params.yaml``: the file, the strict section type, one-line errors, and the ``data`` section.

:mod:`cxr.params` builds the whole typed view on this module. The ``download`` stage reads
only the ``data`` section through :func:`load_data_params`, so it imports this small module
alone and DVC does not refetch the data set when the rest of the params code changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cxr.errors import PipelineError, first_line

CLASSES = ("COVID19", "NORMAL", "PNEUMONIA")
MAX_SEED = 2**32 - 1  # numpy's seeds are unsigned 32-bit integers
Model = TypeVar("Model", bound=BaseModel)


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; users mean the number."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


Number = Annotated[float, BeforeValidator(_yaml_float)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Section(BaseModel):
    """A params section: unknown keys are typos, and strict types turn no true into 1 or 10.5 into 10.

    (Ints are still accepted where numbers are, and become floats.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    """Where the raw images come from and which classes they hold."""

    source: str = "kaggle"
    kaggle_handle: str = "prashant268/chest-xray-covid19-pneumonia/versions/1"
    classes: list[str] = list(CLASSES)


class _DataOnly(BaseModel):
    """The ``data`` section alone; other sections are left to the stages that read them."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    data: DataParams


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "list_type": "a list of a string", "literal_error": "a string"}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _walk(root: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[Any, Any, tuple[tuple[int, str], ...]]:
    """The model and field a pydantic error location points at, and its place in today's check order.

    The place sorts a section's unknown keys (by name) before its fields (in declared order), so
    the one error reported is the one the hand-written checks used to stop at.
    """
    model, field, place = root, None, []
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if isinstance(part, int) or part not in fields:
            place.append((part, "") if isinstance(part, int) else (-1, part))
            continue
        place.append((list(fields).index(part), ""))
        field = fields[part]
        # an optional section (``X | None``) is walked into as its model
        model = next((arg for arg in get_args(field.annotation) if hasattr(arg, "model_fields")), field.annotation)
    return model, field, tuple(place)


def _message(root: type[BaseModel], error: Any) -> str:
    """One line naming the dotted key of a pydantic error and what it allows there."""
    loc, kind, value = error["loc"], error["type"], error["input"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    model, field, _ = _walk(root, loc if kind != "extra_forbidden" else loc[:-1])
    if kind == "extra_forbidden":
        where = f"in {key.rpartition('.')[0]}" if len(loc) > 1 else "at the top level"
        return f"unknown key {key}; allowed keys {where}: {', '.join(model.model_fields)}"
    if kind == "missing":
        return f"missing {'section' if len(loc) == 1 else 'key'} {key}"
    if kind == "model_type":
        return f"{key or 'the file'} must be a mapping of keys, got {value!r}"
    if kind == "literal_error" and isinstance(value, str):
        return f"{key} is {value!r}; allowed: {', '.join(get_args(field.annotation))}"
    if kind in _TYPE_NAMES:
        return f"{key} must be {_TYPE_NAMES[kind]}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = [f"{sign} {getattr(rule, name)}" for rule in field.metadata for name, sign in _BOUNDS.items()
                  if hasattr(rule, name)]
        value = float(value) if field.annotation is float else value  # an int given for a number shows as one
        return f"{key} is {value!r}; allowed: {' and '.join(bounds)}"
    return f"{key}: {error['msg']}"


def validated(root: type[Model], raw: dict[str, Any]) -> Model:
    """``raw`` (as read from YAML) validated as ``root``; the first problem becomes a one-line PipelineError."""
    try:
        return root.model_validate(raw)
    except ValidationError as err:
        first = min(err.errors(), key=lambda error: _walk(root, error["loc"])[2])
        raise PipelineError(f"params.yaml: {_message(root, first)}") from None


def check_classes(data: DataParams) -> None:
    """The class list is fixed (it is the label order); only its order in ``data.classes`` may vary."""
    if sorted(data.classes) != sorted(CLASSES) or len(data.classes) != len(CLASSES):
        raise PipelineError(f"params.yaml: data.classes must list exactly {', '.join(CLASSES)}")


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The YAML mapping in ``path``; every problem reading it is a one-line :class:`PipelineError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"params file not found: {path}") from None
    except IsADirectoryError:
        raise PipelineError(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err.strerror or first_line(err)}") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {first_line(err)}") from None
    return raw or {}


def load_data_params(path: str | Path = "params.yaml") -> DataParams:
    """Read and validate the ``data`` section of ``params.yaml`` only (the download stage's whole need)."""
    data = validated(_DataOnly, read_params_file(path)).data
    check_classes(data)
    return data
