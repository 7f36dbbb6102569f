"""What every ``rayjobs/<stage>.py`` shares: parse ``--config``/``--set``, validate, call the job, print JSON.

Each entrypoint is submitted with ``ray job submit --working-dir . -- python rayjobs/<stage>.py --config
FILE``. Ray is joined by the job itself, as the CLI's commands do (:func:`scenecluster.raycluster.ensure_ray`):
the job server sets ``RAY_ADDRESS``, so it joins the cluster the job was submitted to; run by hand it honours
``resources.ray_address`` and ``resources.num_cpus``, and without an address starts a private local Ray rather
than joining whatever ``ray start`` last recorded on the machine, which a bare ``ray.init()`` here would do.
Exit codes: 0 done, 2 bad config or input (one line on stderr, no traceback), 1 anything else (a bug: the
traceback is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any


def build_parser(description: str, *, overwrite: bool = False) -> argparse.ArgumentParser:
    """``--config`` and ``--set`` for every entrypoint; ``--overwrite`` only for those whose call uses it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", metavar="YAML", help="config file (see rayjobs/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="a.b=v",
        help="dotted override of any setting, repeatable (value read as YAML)",
    )
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace an output folder that holds another run")
    return parser


def run(
    name: str,
    argv: Sequence[str] | None,
    *,
    model: type,
    call: Callable[[Any, argparse.Namespace], dict[str, Any]],
    description: str,
    overwrite: bool = False,
) -> int:
    """Validate the config (before Ray starts, so a typo costs no cluster time), then call the job, which joins
    or starts Ray through :func:`scenecluster.raycluster.ensure_ray`.

    ``overwrite=True`` adds the ``--overwrite`` flag (``args.overwrite``), for entrypoints whose call takes it.
    """
    from scenecluster.cli import line_buffered_output
    from scenecluster.config import load_config, parse_override
    from scenecluster.errors import SceneClusterError

    args = build_parser(description, overwrite=overwrite).parse_args(argv)
    line_buffered_output()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        cfg = load_config(args.config, overrides, model=model)
    except SceneClusterError as exc:
        print(f"rayjobs/{name}: error: {exc}", file=sys.stderr)
        return 2

    try:
        result = call(cfg, args)
    except SceneClusterError as exc:
        print(f"rayjobs/{name}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
