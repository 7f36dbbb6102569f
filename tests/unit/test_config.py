import pytest

from scenecluster.config import NULL, ClusterJobConfig, dump_config, load_config, parse_override
from scenecluster.errors import ConfigError


def test_defaults_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("output: out\ndata: {input: /scenes}\nembed: {batch_size: 8}\n")
    cfg = load_config(cfg_file, {"embed.batch_size": 16, "cluster.n_components": 20})
    assert cfg.embed.batch_size == 16
    assert cfg.cluster.n_components == 20
    assert cfg.reduce.n_components == 5  # default kept


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, {"output": "o", "data.input": "/x", "embed.pooling": "cls+mean"})
    f = tmp_path / "r.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg
    assert isinstance(cfg, ClusterJobConfig)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"embed.batch_size": 0}, "embed.batch_size"),
        ({"embed.pooling": "max"}, "embed.pooling"),
        ({"cluster.bogus": 1}, "cluster.bogus"),
        ({"reduce.n_neighbors": 1}, "reduce.n_neighbors"),
    ],
)
def test_bad_setting_is_named(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, {"output": "o", "data.input": "/x", **overrides})


def test_a_renamed_setting_names_its_new_name():
    # the neighbourhood prior's weight changed meaning (per scene of a mean cluster, not per fitted scene)
    with pytest.raises(ConfigError, match=r"cluster\.neighbourhood_prior: .*became neighbourhood_weight"):
        load_config(None, {"output": "o", "data.input": "/x", "cluster.neighbourhood_prior": 0.4})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 3, column 1\)"):  # where the parser stopped
        load_config(bad)


def test_parse_override_reads_yaml_values():
    assert parse_override("cluster.tol=1e-4") == ("cluster.tol", 1e-4)
    assert parse_override("embed.model=facebook/dinov2-base") == ("embed.model", "facebook/dinov2-base")
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_an_explicit_null_override_clears_what_the_config_file_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("output: o\ndata: {input: /x}\nreduce: {random_state: 7}\ncluster: {covariance_prior_scale: 0.5}\n")
    overrides = dict(parse_override(t) for t in ["reduce.random_state=null", "cluster.covariance_prior_scale=~"])
    assert overrides == {"reduce.random_state": NULL, "cluster.covariance_prior_scale": NULL}
    cfg = load_config(f, overrides)
    assert cfg.reduce.random_state is None and cfg.cluster.covariance_prior_scale is None
    assert load_config(f, {"reduce.random_state": None}).reduce.random_state == 7  # None: a flag not given
    with pytest.raises(ConfigError, match=r"embed\.batch_size"):
        load_config(f, dict([parse_override("embed.batch_size=null")]))


def test_tune_keeps_the_data_prior_whose_scale_it_searches_unless_a_prior_is_named():
    from pathlib import Path

    from scenecluster.config import TuneJobConfig

    base = {"embeddings": "e.parquet", "output": "tune"}
    assert load_config(None, base, model=TuneJobConfig).cluster.prior_covariance == "data"
    # a cluster section of its own (the shipped example has one, so does --set cluster.x=...) keeps it too
    shipped = Path(__file__).parents[2] / "rayjobs" / "configs" / "tune.yaml"
    assert load_config(shipped, base, model=TuneJobConfig).cluster.prior_covariance == "data"
    overridden = load_config(None, {**base, "cluster.n_components": 30}, model=TuneJobConfig)
    assert overridden.cluster.prior_covariance == "data"
    named = load_config(None, {**base, "cluster.prior_covariance": "neighbourhoods"}, model=TuneJobConfig)
    assert named.cluster.prior_covariance == "neighbourhoods"
    # the clustering job itself defaults to the neighbourhood prior
    assert ClusterJobConfig.model_validate({"output": "o", "data": {"input": "i"}}).cluster.prior_covariance == (
        "neighbourhoods"
    )


def test_tune_uses_the_neighbour_counts_it_searches_unless_a_share_is_named():
    """With a neighbour share, UMAP's neighbours are a share of the fitted scenes capped by n_neighbors; a Tune
    trial's searched n_neighbors must be used as it is, with or without a reduce section of its own, so Tune's
    share is 0 unless named (as is the job's default; a new default must not reach Tune unnoticed)."""
    from pathlib import Path

    from scenecluster.config import TuneJobConfig

    base = {"embeddings": "e.parquet", "output": "tune"}
    shipped = Path(__file__).parents[2] / "rayjobs" / "configs" / "tune.yaml"  # it has a reduce section
    assert load_config(None, base, model=TuneJobConfig).reduce.neighbors_share == 0
    assert load_config(shipped, base, model=TuneJobConfig).reduce.neighbors_share == 0
    assert load_config(None, {**base, "reduce.min_dist": 0.1}, model=TuneJobConfig).reduce.neighbors_share == 0
    named = load_config(None, {**base, "reduce.neighbors_share": 0.02}, model=TuneJobConfig)
    assert named.reduce.neighbors_share == 0.02
    assert ClusterJobConfig.model_validate({"output": "o", "data": {"input": "i"}}).reduce.neighbors_share == 0
