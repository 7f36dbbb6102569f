"""The identity of a feature vector, resolved and checked once in the driver.

A run's feature is fixed by the model, hidden layer, pooling, image size and how pixels become 8-bit RGB.
:func:`resolve_feature_spec` turns them into a frozen :class:`FeatureSpec` before any Ray task starts: it reads
the model's config (not its weights), checks the layer against it, and records what was resolved at run time
(the folder or id workers load, the layer as a 1-based index, the width and the pixel statistics). The spec then
travels whole, from the job to the embedding actors, instead of as loose keyword arguments; its
:meth:`FeatureSpec.identity` keys the resumable embedding parts and the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from scenecluster.data import store_credentials
from scenecluster.errors import ConfigError
from scenecluster.model_store import is_store_uri
from scenecluster.models import POOLINGS, pooled_width, resolve_backbone
from scenecluster.pixels import PixelSpec
from scenecluster.views import VIEWS

__all__ = ["FeatureSpec", "resolve_feature_spec", "revealed_keys", "store_access"]


@dataclass(frozen=True)
class FeatureSpec:
    """One feature: the ``pooling`` of hidden layer ``layer`` of ``model`` on ``image_size`` px images.

    Attributes
    ----------
    model : str
        The model as the user named it (Hub id, folder or ``s3://`` URI), or the run's copy of a local folder
        (``<output>/model`` for an output in object storage); part of the identity.
    requested_layer : int
        The layer as configured (``-1`` = last, ``0`` = the model's choice); part of the identity, except that
        ``0`` is recorded as the layer it resolved to (so it shares embeddings with that layer named outright).
    pooling : {"cls", "cls+mean"}
    image_size : int
    source : str
        What workers pass to :func:`scenecluster.models.load_backbone` (a resolved folder or a cached id).
    layer : int
        The hidden layer as a 1-based index, ``1 .. n_layers``.
    n_layers, hidden_size : int
        From the model's config.
    mean, std : tuple of float
        Pixel normalisation the model expects, in 0..1 units.
    pixels : PixelSpec
        How scenes of other bit depths and band counts become 8-bit RGB; part of the identity.
    views : {"one", "rot90", "d4"}
        Test-time views the feature is averaged over (:mod:`scenecluster.views`); part of the identity when not
        ``"one"``, so runs made before the setting existed keep their identity and are reused.
    weights : str or None
        :func:`scenecluster.models.weights_fingerprint` of the weights ``source`` held when resolved; part of the
        identity when known, so a model folder rewritten in place (a fine-tune's ``OUTPUT/backbone``) is another
        feature, not a reason to reuse the old weights' embeddings or clustering.
    endpoint_url : str or None
        The S3 endpoint of an ``s3://`` model on a non-AWS store (the driver's ``data.endpoint_url``, else its
        ``AWS_ENDPOINT_URL``), so that workers fetch it from there; not part of the identity (the weights are).
    credentials : dict or None
        The driver's explicit S3 keys for an ``s3://`` model (:func:`scenecluster.data.store_credentials`),
        carried to the workers as the job's pickled filesystem carries them, as ``SecretStr`` (:func:`store_access`);
        never printed, compared or written.
    """

    model: str
    requested_layer: int
    pooling: str
    image_size: int
    source: str
    layer: int
    n_layers: int
    hidden_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixels: PixelSpec = PixelSpec()
    views: str = "one"
    weights: str | None = None
    endpoint_url: str | None = None
    credentials: dict[str, SecretStr] | None = field(default=None, repr=False, compare=False)

    @property
    def n_features(self) -> int:
        """Width of the feature vector."""
        return pooled_width(self.hidden_size, self.pooling)

    @property
    def is_last_layer(self) -> bool:
        return self.layer == self.n_layers

    def identity(self) -> dict[str, Any]:
        """The settings that determine the vectors: equal identities may reuse each other's embeddings."""
        return {
            "model": self.model,
            "layer": self.layer if self.requested_layer == 0 else self.requested_layer,
            "pooling": self.pooling,
            "image_size": self.image_size,
            **self.pixels.identity(),
            **({"views": self.views} if self.views != "one" else {}),
            **({"weights": self.weights} if self.weights is not None else {}),
        }


def resolve_feature_spec(
    model: str,
    *,
    layer: int = -1,
    pooling: str = "cls",
    image_size: int = 224,
    pixels: PixelSpec | None = None,
    views: str = "one",
    endpoint_url: str | None = None,
) -> FeatureSpec:
    """Resolve and check a feature's settings against the model's config, without loading its weights.

    Raises
    ------
    ConfigError
        Naming ``embed.layer`` or ``embed.pooling`` when the model cannot give that feature.
    scenecluster.models.ModelLoadError
        When the model cannot be found or read.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"setting embed.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    if views not in VIEWS:
        raise ConfigError(f"setting embed.views: {views!r} is not one of {', '.join(VIEWS)}")
    backbone = resolve_backbone(model, endpoint_url=endpoint_url)
    n_layers = int(backbone.num_hidden_layers)
    index = layer if layer > 0 else n_layers + 1 + layer
    if layer == 0:  # the model's own choice: the layer its config names, else the last
        index = backbone.feature_layer or n_layers
    if not 1 <= index <= n_layers:
        raise ConfigError(
            f"setting embed.layer: layer must be in 1..{n_layers}, -{n_layers}..-1 or 0 (the model's choice) "
            f"({model} has {n_layers} blocks), not {index if layer == 0 else layer}"
        )
    return FeatureSpec(
        model=str(model),
        requested_layer=layer,
        pooling=pooling,
        image_size=image_size,
        source=str(backbone.source),
        layer=index,
        n_layers=n_layers,
        hidden_size=int(backbone.hidden_size),
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        pixels=pixels or PixelSpec(),
        views=views,
        weights=backbone.weights,
        **store_access(str(backbone.source), endpoint_url),
    )


def store_access(source: str, endpoint_url: str | None) -> dict[str, Any]:
    """The spec's ``endpoint_url`` and ``credentials`` for workers that load ``source``: the driver's own store
    settings for an ``s3://`` model, else only the configured endpoint.

    The keys are ``SecretStr``: Ray records what it hands to workers (Ray Data's operator arguments, Ray Train's
    loop config) as ``str()`` of each value in its run state and, when the cluster enables them, its export
    events, and a ``SecretStr`` prints as stars there. Workers unwrap them with :func:`revealed_keys`.
    """
    if not is_store_uri(source):
        return {"endpoint_url": endpoint_url}
    keys = store_credentials()
    return {
        "endpoint_url": endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        "credentials": {k: SecretStr(v) for k, v in keys.items()} if keys else None,
    }


def revealed_keys(keys: dict[str, SecretStr] | None) -> dict[str, str] | None:
    """The plain S3 keys :func:`store_access` hid, for the boto3 client that fetches the model."""
    return {k: v.get_secret_value() for k, v in keys.items()} if keys else None
