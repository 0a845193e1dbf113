"""Settings: one object, read from `CELLNODE_*` environment variables, with the CLI flags mirroring it."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cellnode.exceptions import ConfigError

DEFAULT_PORT = 8080
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/cellnode`, or `~/.local/share/cellnode`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cellnode"


def default_profile_path() -> Path:
    """Where `serve` leaves the URL and key file for the CLI on the same machine."""
    explicit = os.environ.get("CELLNODE_PROFILE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cellnode" / "profile.json"


class Settings(BaseSettings):
    """Server settings. Each field is also `CELLNODE_<NAME>` in the environment; the common ones are `serve` flags."""

    model_config = SettingsConfigDict(env_prefix="CELLNODE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on. Defaults to 127.0.0.1 (this machine only).")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="HTTP port. Defaults to 8080; 0 picks a free one.")
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="gRPC port (NodeService, typed node services, health, reflection). Default: no gRPC; 0 picks one.",
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Directory for the database, blobs, logs.")
    database_url: str | None = Field(None, description="SQLAlchemy URL. Defaults to SQLite in the data directory.")
    backend: str = Field("local", description="Where instances run. Only 'local' (processes on this machine) now.")
    capture_timeout: float = Field(
        600.0, gt=0, description="Seconds each notebook cell may run during a capture. Defaults to 600."
    )
    max_captures: int = Field(2, ge=1, description="Captures (kernels) that may run at once; others wait. Default 2.")
    instance_start_timeout: float = Field(120.0, gt=0, description="Seconds an instance may take to load.")
    profile: Path | None = Field(None, description="Profile file written for the local CLI; 'none' to skip.")
    specs_file: Path | None = Field(None, description="JSON spec table replacing the reference's. Default: none.")
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    liveness_interval: float = Field(5.0, gt=0, description="Seconds between liveness checks of idle instances.")
    liveness_timeout: float = Field(
        10.0, gt=0, description="Seconds an idle instance may take to answer a liveness check before it is replaced."
    )
    overcommit: bool = Field(
        True,
        description="Let instances' specs add up to more CPU and memory than this machine has (so c1.4 runs on a "
        "laptop). Off: a node whose instances (at their maximum count) would not fit is refused. Defaults to on.",
    )
    autoscale_target: float = Field(
        0.8, gt=0, le=1, description="Busy fraction the autoscaler aims for per instance. Defaults to 0.8."
    )
    scale_up_cooldown: float = Field(
        6.0, gt=0, description="Seconds of load the autoscaler averages to add instances, and waits between changes."
    )
    scale_down_cooldown: float = Field(
        60.0, gt=0, description="Seconds of load it averages to remove instances, and waits after any change."
    )
    log_retention_hours: float = Field(
        168.0, gt=0, description="Hours an ended instance's log files are kept. Defaults to 168 (7 days)."
    )
    log_max_mb: int = Field(
        200, ge=1, description="MB of log files kept per node; the oldest ended instances' go first. Default 200."
    )
    telemetry_interval: float = Field(
        15.0, gt=0, le=3600, description="Seconds between scrapes of docker nodes' metrics pages. Defaults to 15."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS (with tls_key).")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    insecure: bool = Field(
        False,
        description="Allow plain HTTP on an address other than loopback: credentials and data cross the network in "
        "clear, so only behind a TLS proxy on the same machine.",
    )
    auth_failure_limit: int = Field(
        20, ge=0, description="Failed authentications a client address may make per minute before 429; 0: no limit."
    )
    idle_timeout: int = Field(
        300, ge=1, le=86_400, description="Seconds an idle client connection stays open. Defaults to 300."
    )
    # A SecretStr never prints; it is checked (base64 of 32 bytes) where it is used, in `cellnode.iam.secrets`,
    # because a validation error here would quote the value.
    master_key: SecretStr | None = Field(
        None,
        description="Base64 of the 32-byte key that encrypts secrets. Default: DATA_DIR/master.key, made at first "
        "start. Set it on every server that shares a database.",
    )

    alias_prefixes: str = Field(
        "datasphere.user",
        description="Comma-separated prefixes aliases may take; the routing name is PREFIX.NAME. Defaults to "
        "'datasphere.user', the reference's only user prefix.",
    )

    @field_validator("alias_prefixes")
    @classmethod
    def _prefixes(cls, value: str) -> str:
        for prefix in value.split(","):
            if not ALIAS_PREFIX.match(prefix.strip()):
                raise ValueError(
                    f"alias prefix {prefix.strip()!r} is not allowed; use dot-separated lowercase words such as "
                    "'datasphere.user' (letters, digits and hyphens, each word starting with a letter)"
                )
        return value

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The alias prefixes in force, the first being the default."""
        return tuple(prefix.strip() for prefix in self.alias_prefixes.split(","))

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(sorted(BACKENDS))}")
        return value

    @model_validator(mode="after")
    def _safe_listening(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert (CELLNODE_TLS_CERT) and tls_key (CELLNODE_TLS_KEY), or neither")
        if not is_loopback(self.host) and self.tls_cert is None and not self.insecure:
            raise ValueError(
                f"host {self.host!r} is not a loopback address, and without TLS API keys and data would cross the "
                "network in clear; give --tls-cert and --tls-key, or --insecure if a TLS proxy on this machine "
                "fronts the server"
            )
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port (CELLNODE_GRPC_PORT, --grpc-port) is {self.grpc_port}, the same as the HTTP port; give "
                "each its own port, or 0 to pick a free one"
            )
        return self

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # The profile names the key file by path; a relative one would break the CLI in any other directory.
        return value.expanduser().resolve()

    @property
    def db_url(self) -> str:
        """The database URL in force."""
        return self.database_url or f"sqlite:///{self.data_dir / 'cellnode.db'}"

    @property
    def admin_key_path(self) -> Path:
        """The 0600 file that holds the first admin API key."""
        return self.data_dir / "admin.key"


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Backends by name, resolved once when the server starts (uvicorn's `loops/auto.py` pattern).
ALIAS_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,30}(\.[a-z][a-z0-9-]{0,30}){0,3}$")
BACKENDS = {"local": "cellnode.backends.local:LocalBackend"}


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with the non-None `overrides` (CLI flags) on top; ConfigError on a bad value."""
    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            if not key:  # A rule across settings: its input is all of them, secrets included; never print it.
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            problems.append(f"{key} (CELLNODE_{key.upper()}) has value {error.get('input')!r}: {error['msg']}")
        raise ConfigError("Invalid settings: " + "; ".join(problems) + ".") from exc
