"""Ray job: fine-tune a DINOv2 backbone on labelled sources (:func:`scenecluster.train.fit_backbone`).

ray job submit --working-dir . -- python rayjobs/finetune.py --config rayjobs/configs/finetune.yaml
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from _entry import run


def _finetune(cfg, args) -> dict:
    from scenecluster.train import fit_backbone  # lazy: Ray Train and torch only here

    backbone = Path(fit_backbone(cfg))
    metrics_file = backbone.parent / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"backbone": str(backbone), **metrics}


def main(argv: Sequence[str] | None = None) -> int:
    from scenecluster.config import FinetuneConfig

    return run("finetune", argv, model=FinetuneConfig, description=__doc__, call=_finetune)


if __name__ == "__main__":
    sys.exit(main())
