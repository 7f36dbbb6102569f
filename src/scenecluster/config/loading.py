"""Defaults, then a YAML file, then dotted overrides (``embed.batch_size=64``), validated into one job's
configuration (:func:`load_config`), with one line naming each bad setting; and the resolved YAML written beside a
run's outputs (:func:`dump_config`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from scenecluster.config.jobs import ClusterJobConfig
from scenecluster.errors import ConfigError, one_line


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


class _Null:
    """An override's explicit ``null``: :func:`load_config` sets the setting to ``None``.

    Why not ``None`` itself: in an overrides dict ``None`` means a flag that was not given, which leaves the
    setting alone; ``--set reduce.random_state=null`` must clear a value that a config file set.
    """

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def parse_override(text: str) -> tuple[str, Any]:
    """``"embed.batch_size=64"`` -> ``("embed.batch_size", 64)``; the value is read as YAML (``null``, ``~``
    or nothing is :data:`NULL`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if value is None:
        return key.strip(), NULL
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; a number is meant
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    model: type[BaseModel] = ClusterJobConfig,
) -> Any:
    """Defaults -> YAML file -> dotted overrides, validated.

    Raises
    ------
    ConfigError
        Naming the file or the dotted setting at fault.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        from scenecluster.data import local_path

        try:
            p = Path(local_path(str(path))).expanduser()
        except ValueError as exc:
            raise ConfigError(f"config file: {exc}") from None
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; give the YAML file in it")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {one_line(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror or one_line(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is NULL:
            set_dotted(tree, key, None)
        elif value is not None:  # None: a flag that was not given
            set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=str(path) if path else None)) from None


# Settings renamed because their meaning changed: a config written for the old meaning fails, and says what to use.
RENAMED_SETTINGS = {
    "neighbourhood_prior": "no longer a setting: it became neighbourhood_weight in the same section, a weight per "
    "scene of a cluster of mean size (4.0 there is 0.4 here at 10 clusters; docs/benchmarks.md)",
}


def describe_validation_error(exc: ValidationError, source: str | None = None) -> str:
    """One line per bad setting, with its dotted name (and, for a renamed one, its new name)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's wrapper of our validators' own words
        renamed = RENAMED_SETTINGS.get(str(err["loc"][-1])) if err["type"] == "extra_forbidden" else None
        if renamed:
            message = renamed
        parts.append(f"setting {loc}: {message}")
    where = f" in {source!r}" if source else ""
    return f"invalid configuration{where}: " + "; ".join(parts)


def dump_config(cfg: BaseModel) -> str:
    """The resolved configuration as YAML, for ``OUT/config.yaml``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
