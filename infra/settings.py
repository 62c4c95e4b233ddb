"""Settings from the environment (prefix ``HVP_``) or a ``.env`` file: where the catalog lives, where data comes from.

Every flow and CLI command reads these; pass ``--catalog`` (or set ``HVP_CATALOG``) to point at another catalog,
local or any fsspec URL.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Pipeline configuration; each field can be set as ``HVP_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="HVP_", env_file=".env", extra="ignore")

    catalog: str = Field(default="./hvp-data/catalog", description="catalog URI: a directory or an fsspec URL")
    source_root: Path = Field(default=Path("./hvp-data/sources"), description="folder of dataset folders")
    # Cube layout of new ingests (catalog/cubes/__init__.py explains the defaults, measured by bench/loader.py).
    chunk_xy: int = Field(default=64, ge=8, description="spatial chunk edge of stored cubes")
    cube_band_group: int = Field(default=0, ge=0, description="bands per chunk (0 = all bands in every chunk)")
    cube_shard_xy: int = Field(default=1024, ge=0, description="shard edge in pixels, rounded up to whole chunks "
                               "(0 = one file per chunk)")
    cube_codec: Literal["none", "lz4", "zstd"] = Field(default="none", description="Blosc compressor of stored "
                                                       "cubes (none: raw chunks; noisy sensor data barely "
                                                       "compresses with codecs fast enough to feed a GPU)")
    cube_shuffle: Literal["none", "byte", "bit"] = Field(default="none", description="Blosc shuffle filter")
    compression_level: int = Field(default=1, ge=1, le=9, description="Blosc compression level of the cube store")
    read_threads: int = Field(default=2, ge=1, description="chunk decode threads per process (a DataLoader "
                              "worker uses 1)")
    chunk_cache_mb: float = Field(default=256.0, ge=0, description="decoded-chunk cache per process (MB)")
    dask_address: str | None = Field(default=None, description="scheduler address of a running Dask cluster")
    crashed_after_s: int = Field(
        default=600, ge=60, description="servers this project starts mark a running flow run Crashed when no "
        "heartbeat of it arrived for this long (its process or machine died); keep it at least twice the heartbeat "
        "period of every flow run (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Prefect's default 180 s)")
    server_auth: SecretStr | None = Field(
        default=None, description="basic-authentication credential 'user:password' of the Prefect server: servers "
        "this project starts require it, its clients (CLI, worker, watcher) send it; never printed or logged")

    # Pseudo-labelling overrides of the production profile (pipelines/profiles/production.yaml: SAM 2.1 Hiera-B+ at
    # 1024 px, HyperFree-b, the branches' own thresholds); empty fields leave the profile's value. Without a
    # checkpoint each model is built with random weights and every artifact says "random-init". JSON for dicts.
    sam2_model: dict[str, Any] | None = Field(
        default=None, description='SAM2 config name and input size, e.g. {"config": '
        '"configs/sam2.1/sam2.1_hiera_l.yaml", "image_size": 1024} (empty: the profile\'s)')
    sam2_checkpoint: Path | None = Field(default=None, description="local SAM2 checkpoint (.pt with a 'model' key)")
    spatial_params: dict[str, Any] = Field(default_factory=dict, description="SAM2 automatic-mask parameters")
    spectral_params: dict[str, Any] = Field(default_factory=dict, description="stride, vote, nms_thresh, "
                                            "max_objects and the seed generator's parameters")
    hyperfree_model: dict[str, Any] | None = Field(
        default=None, description='material labeller layout (any registry name), e.g. {"model": "hyperfree_b"} '
        "(empty: the profile's)")
    hyperfree_checkpoint: Path | None = Field(default=None, description="local HyperFree .pth/.safetensors")
    material_params: dict[str, Any] = Field(default_factory=dict, description="automatic-mask parameters "
                                            "(default: Seg-Any-HSI's points_per_side 32, thresholds 0.6)")
    fuse_tau: float | None = Field(default=None, gt=0, le=1, description="IoU threshold of the global NMS in "
                                   "fusion (empty: the profile's, 0.7)")
    label_batch: int = Field(default=8, ge=1, description="images per labelling task, a shard (amortises task "
                             "overhead)")
    features_shard: int = Field(default=16, ge=1, description="images per features task, a shard")
    ingest_shard: int = Field(default=8, ge=1, description="source files per ingest task, a shard")
    label_in_flight: int = Field(default=8, ge=1, description="shards of one branch submitted and unfinished at "
                                 "once (bounds what the engine holds; >= 2 per worker keeps every worker busy)")


@cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()


def cube_options(settings: Settings | None = None) -> dict[str, Any]:
    """The cube-store options a Catalog takes, as the settings give them (passed on to tasks and workers)."""
    s = settings or get_settings()
    layout = {"chunk_xy": s.chunk_xy, "band_group": s.cube_band_group, "shard_xy": s.cube_shard_xy,
              "codec": s.cube_codec, "level": s.compression_level, "shuffle": s.cube_shuffle}
    return {"layout": layout, "read_threads": s.read_threads, "chunk_cache_mb": s.chunk_cache_mb}
