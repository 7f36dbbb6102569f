"""One validated configuration for a clustering run.

Built from defaults, then a YAML file, then dotted overrides (``embed.batch_size=64``), and validated on
load so a bad setting fails before any Ray task starts, with a message naming the setting. The same dotted
names serve the CLI, Ray Tune's search space and the resolved ``config.yaml`` written beside the outputs.

Its parts: :mod:`~scenecluster.config.sections` (the settings jobs share, a section each),
:mod:`~scenecluster.config.jobs` (each job's whole configuration), :mod:`~scenecluster.config.loading`
(defaults -> YAML -> overrides, and the resolved YAML) and :mod:`~scenecluster.config.reference` (command-line flags
and ``docs/configuration.md``, read off the fields). Import from here: the names below are the package's interface.
"""

from scenecluster.config.jobs import (
    PSEUDO_LABELS_FILE,
    AssignJobConfig,
    BenchmarkConfig,
    ClusterJobConfig,
    FinetuneConfig,
    PipelineConfig,
    SearchSpace,
    SelfTrainConfig,
    TuneJobConfig,
)
from scenecluster.config.loading import (
    NULL,
    RENAMED_SETTINGS,
    describe_validation_error,
    dump_config,
    load_config,
    parse_override,
    set_dotted,
)
from scenecluster.config.reference import ConfigFlag, config_flags, configuration_markdown, settings_table
from scenecluster.config.sections import (
    NEIGHBOURHOOD_RULE,
    ClusterConfig,
    DataConfig,
    EmbedConfig,
    FeatureConfig,
    ReadConfig,
    ReduceConfig,
    ReportConfig,
    ResourcesConfig,
    ScaleConfig,
    flag,
    local_folder,
    storage_location,
)

__all__ = [
    "NEIGHBOURHOOD_RULE",
    "NULL",
    "PSEUDO_LABELS_FILE",
    "RENAMED_SETTINGS",
    "AssignJobConfig",
    "BenchmarkConfig",
    "ClusterConfig",
    "ClusterJobConfig",
    "ConfigFlag",
    "DataConfig",
    "EmbedConfig",
    "FeatureConfig",
    "FinetuneConfig",
    "PipelineConfig",
    "ReadConfig",
    "ReduceConfig",
    "ReportConfig",
    "ResourcesConfig",
    "ScaleConfig",
    "SearchSpace",
    "SelfTrainConfig",
    "TuneJobConfig",
    "config_flags",
    "configuration_markdown",
    "describe_validation_error",
    "dump_config",
    "flag",
    "load_config",
    "local_folder",
    "parse_override",
    "set_dotted",
    "settings_table",
    "storage_location",
]
