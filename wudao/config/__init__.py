"""One typed settings tree for the whole platform.

Sources, highest priority first: keyword arguments, environment (`WUDAO_*`, nested sections with `__`, e.g.
`WUDAO_TRAIN__STEPS=20`, plus the standard `MLFLOW_TRACKING_URI`, `PREFECT_API_URL`, `AWS_*`), an optional TOML
file (`$WUDAO_CONFIG`, else `./wudao.toml`), then the defaults (below and in `wudao.config.sections`). Every
field's docstring is its documentation.

Only `wudao.cli` and the flows build a `Settings`; library code receives the section it needs as an argument,
so there is no global configuration object. The root `Settings` lives here; its sections (one model each, with
their defaults) in `wudao.config.sections`, re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from wudao.config.sections import (
    RECIPE,
    CleanSettings,
    EvalSettings,
    GateSettings,
    IngestSettings,
    ModelSettings,
    OrchestrationSettings,
    RegistrySettings,
    StackSettings,
    TrainSettings,
    TuneSettings,
)

__all__ = [
    "OVERRIDES_ENV",
    "RECIPE",
    "CleanSettings",
    "EvalSettings",
    "GateSettings",
    "IngestSettings",
    "ModelSettings",
    "OrchestrationSettings",
    "RegistrySettings",
    "Settings",
    "StackSettings",
    "TrainSettings",
    "TuneSettings",
    "hide_password",
    "load_settings",
]


class Settings(BaseSettings):
    """Root of the settings tree."""

    model_config = SettingsConfigDict(
        env_prefix="WUDAO_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    home: Path = Path(".wudao")
    """State directory (catalog DB, stack data, pid files, logs, local caches). Env: WUDAO_HOME."""
    storage_uri: str | None = None
    """Where artefacts live: `s3://bucket[/prefix]` or a local folder. Default: the local stack's bucket when the
    stack is up, else `$WUDAO_HOME/objects`. Env: WUDAO_STORAGE_URI."""
    catalog_url: str | None = None
    """SQLAlchemy URL of the catalog DB. Default: SQLite file `$WUDAO_HOME/catalog.db`. Env: WUDAO_CATALOG_URL."""
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "WUDAO_MLFLOW_TRACKING_URI")
    )
    """MLflow tracking server. Default: the local stack's server when it is up, else a SQLite store under
    `$WUDAO_HOME/mlflow`. Env: MLFLOW_TRACKING_URI."""
    prefect_api_url: str | None = Field(None, validation_alias=AliasChoices("PREFECT_API_URL", "WUDAO_PREFECT_API_URL"))
    """Prefect API. Default: the local stack's server when it is up, else Prefect's own default. Env: PREFECT_API_URL."""
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "WUDAO_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"
        ),
    )
    """S3 endpoint for non-AWS stores (MinIO, SeaweedFS). Default: the local stack's endpoint when it is up."""
    aws_access_key_id: SecretStr | None = Field(None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID"))
    """S3 access key. Default: the local stack's generated key (a 0600 file under `$WUDAO_HOME/stack`)."""
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"))
    """S3 secret key; never printed or logged."""
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"))
    """S3 region name."""

    ingest: IngestSettings = IngestSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    tune: TuneSettings = TuneSettings()
    stack: StackSettings = StackSettings()
    registry: RegistrySettings = RegistrySettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("WUDAO_CONFIG", "wudao.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, file_secret_settings]
        if toml_path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    # ---- resolved values: explicit setting, else the running local stack, else a local default ----

    def resolved(self) -> Settings:
        """A copy with every service location filled in, preferring the local stack when it is up."""
        from wudao.stack.state import read_s3_credentials, running_endpoints  # reads the stack's files; starts nothing

        home = self.home.resolve()
        running = running_endpoints(home, self.stack)
        updates: dict[str, Any] = {"home": home}
        if self.storage_uri is None:
            if running.s3_endpoint:
                updates["storage_uri"] = f"s3://{self.stack.bucket}"
            else:
                updates["storage_uri"] = str(home / "objects")
        if self.s3_endpoint_url is None and running.s3_endpoint:
            updates["s3_endpoint_url"] = running.s3_endpoint
        if self.aws_access_key_id is None and running.s3_endpoint:
            key_id, secret = read_s3_credentials(home)
            updates["aws_access_key_id"] = SecretStr(key_id)
            updates["aws_secret_access_key"] = SecretStr(secret)
        if self.catalog_url is None:
            updates["catalog_url"] = f"sqlite:///{home / 'catalog.db'}"
        if self.mlflow_tracking_uri is None:
            updates["mlflow_tracking_uri"] = running.mlflow_url or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
        if self.prefect_api_url is None and running.prefect_api_url:
            updates["prefect_api_url"] = running.prefect_api_url
        return self.model_copy(update=updates)

    def public_dict(self) -> dict[str, Any]:
        """Flat `section.field -> value` view for printing and logging (MLflow params): secrets are left out and
        a password inside any URL (`postgresql://user:pw@host/db`) is replaced by `***`."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, obj: BaseModel) -> None:
            for name in type(obj).model_fields:
                value = getattr(obj, name)
                if isinstance(value, SecretStr):
                    continue
                if isinstance(value, BaseModel):
                    walk(f"{prefix}{name}.", value)
                elif isinstance(value, str):
                    flat[f"{prefix}{name}"] = hide_password(value)
                else:
                    flat[f"{prefix}{name}"] = str(value) if isinstance(value, Path) else value

        walk("", self)
        return flat


def hide_password(url: str) -> str:
    """`scheme://user:***@host/...` for a URL that carries a password; anything else unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


OVERRIDES_ENV = "WUDAO_OVERRIDES"
"""A JSON object of settings overrides handed to a subprocess (how a flow's overrides reach `torchrun` ranks)."""


def load_settings(**overrides: Any) -> Settings:
    """Read the settings tree and resolve service locations (the one entry point for CLI and flows)."""
    if inherited := os.environ.get(OVERRIDES_ENV):
        overrides = _deep_merge(json.loads(inherited), overrides)
    return Settings(**overrides).resolved()


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged
