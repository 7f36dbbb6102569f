"""What the settings' own fields say, read off them: the command-line flags (:func:`config_flags`, which
:mod:`scenecluster.cli` builds its parsers from) and ``docs/configuration.md`` (:func:`configuration_markdown`), so
neither can drift from the defaults and descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


@dataclass(frozen=True)
class ConfigFlag:
    """A command-line flag read off a config field's metadata (see :func:`flag`)."""

    flag: str
    dotted: str
    type: type
    help: str
    choices: tuple[Any, ...] | None = None

    @property
    def is_switch(self) -> bool:
        return self.type is bool


def config_flags(model: type[BaseModel], prefix: str = "") -> list[ConfigFlag]:
    """Every flagged setting of ``model`` and its sections, in field order, with its dotted name.

    Help texts end with the field's real default, so they cannot drift from it.
    """
    flags: list[ConfigFlag] = []
    for name, field in model.model_fields.items():
        scalar, choices = _scalar_type(field.annotation)
        if isinstance(scalar, type) and issubclass(scalar, BaseModel):
            flags += config_flags(scalar, f"{prefix}{name}.")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "flag" not in extra:
            continue
        default = field.get_default()
        text = field.description or ""
        if default is not None and scalar is not bool:
            text += f" (default {default})"
        flags.append(ConfigFlag(str(extra["flag"]), prefix + name, scalar, text, choices))
    return flags


def settings_table(
    model: type[BaseModel], flags: dict[str, str], prefix: str = "", defaults: BaseModel | None = None
) -> list[str]:
    """Markdown rows ``| dotted name | flag | default | what |`` for every setting of ``model`` and its sections.

    ``flags`` maps dotted names to the command-line flag that sets them (empty for a job with no command).
    ``defaults`` is the section's default instance where its parent gives one (a job may default a section
    differently from the section's own defaults: Tune's search keeps the data prior). ``docs/configuration.md``
    is this table for each job (``python -m scenecluster.config`` rewrites it; a test keeps it current), so the
    documentation cannot drift from the defaults.
    """
    rows: list[str] = []
    for name, field in model.model_fields.items():
        scalar, _ = _scalar_type(field.annotation)
        if isinstance(scalar, type) and issubclass(scalar, BaseModel):
            section = getattr(defaults, name) if defaults is not None else None
            if section is None and not field.is_required():
                section = field.get_default()
            section = section if isinstance(section, BaseModel) else None
            rows += settings_table(scalar, flags, f"{prefix}{name}.", section)
            continue
        value = getattr(defaults, name) if defaults is not None else field.get_default()
        default = "(required)" if field.is_required() else f"`{value}`"
        flag = flags.get(f"{prefix}{name}")
        cli = f"`{flag}`" if flag else ""
        rows.append(f"| `{prefix}{name}` | {cli} | {default} | {(field.description or '').replace('|', '/')} |")
    return rows


def configuration_markdown() -> str:
    """The whole of ``docs/configuration.md``."""
    from scenecluster.cli import command_flags  # lazy: the CLI imports this module
    from scenecluster.config import jobs as job_configs

    jobs = [  # (config, the command whose flags fill the flag column, who reads it)
        ("ClusterJobConfig", "cluster", "scenecluster cluster / demo, rayjobs/cluster.py"),
        ("FinetuneConfig", "finetune", "scenecluster finetune, rayjobs/finetune.py"),
        ("PipelineConfig", "pipeline", "scenecluster pipeline, rayjobs/pipeline.py"),
        ("TuneJobConfig", None, "rayjobs/tune.py"),
        ("AssignJobConfig", "assign", "scenecluster assign, rayjobs/assign.py"),
        ("BenchmarkConfig", "benchmark", "scenecluster benchmark, rayjobs/benchmark.py"),
    ]
    parts = [
        "# Configuration\n\n",
        "Generated from `scenecluster.config` by `python -m scenecluster.config` (a test checks it is current).\n",
        "Every job reads defaults, then a YAML file (`--config`), then dotted overrides (`--set a.b=v`, or a flag).\n",
        "The flag column names the flags of that job's command; a setting without one is set by `--set`.\n",
    ]
    for name, command, used_by in jobs:
        model = getattr(job_configs, name)
        flags = command_flags(command) if command else {}
        parts.append(f"\n## {name} ({used_by})\n\n{(model.__doc__ or '').strip().splitlines()[0]}\n\n")
        parts.append("| setting | flag | default | what |\n| --- | --- | --- | --- |\n")
        parts.append("".join(row + "\n" for row in settings_table(model, flags)))
    return "".join(parts)


def _scalar_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """``int | None`` -> ``(int, None)``; ``Literal["a", "b"]`` -> ``(str, ("a", "b"))``."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return type(args[0]), tuple(args)
    if args and get_origin(annotation) in (UnionType, Union) and len(args) == 1:
        return _scalar_type(args[0])
    return annotation, None
