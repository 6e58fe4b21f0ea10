"""Configuration of ``bondtape serve`` from a TOML file and environment variables.

Precedence, highest first: command-line options, ``BONDTAPE_*`` environment variables,
the ``[serve]`` table of the file given with ``--config``, the defaults below. Every key,
its variable and its meaning are listed in docs/deploy.md (a test keeps the two in step).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ServeConfig", "ConfigError", "load_config", "KEYS"]


class ConfigError(ValueError):
    """A setting that cannot be used: ``code`` is stable, ``key`` names the setting."""

    def __init__(self, code: str, key: str, message: str):
        super().__init__(f"{code}: {key}: {message}")
        self.code, self.key, self.message = code, key, message


@dataclass(frozen=True)
class ServeConfig:
    database_url: str | None = None
    nats_url: str | None = None
    host: str = "127.0.0.1"
    port: int | None = 8000
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ca_dir: Path | None = None
    fix_port: int | None = None
    feed_port: int | None = None
    workers: int = 1
    metrics_token: str | None = None
    log_level: str = "info"
    log_format: str = "json"
    shutdown_timeout: float = 30.0
    feed_poll_interval: float = 0.2

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ServeConfig":
        return cls(**{k: _convert(k, v) for k, v in data.items()})


# key -> (environment variable, kind)
KEYS: dict[str, tuple[str, str]] = {
    "database_url": ("BONDTAPE_DATABASE_URL", "str"),
    "nats_url": ("BONDTAPE_NATS_URL", "str"),
    "host": ("BONDTAPE_HOST", "str"),
    "port": ("BONDTAPE_PORT", "port"),
    "tls_port": ("BONDTAPE_TLS_PORT", "port"),
    "tls_cert": ("BONDTAPE_TLS_CERT", "path"),
    "tls_key": ("BONDTAPE_TLS_KEY", "path"),
    "ca_dir": ("BONDTAPE_CA_DIR", "path"),
    "fix_port": ("BONDTAPE_FIX_PORT", "port"),
    "feed_port": ("BONDTAPE_FEED_PORT", "port"),
    "workers": ("BONDTAPE_WORKERS", "workers"),
    "metrics_token": ("BONDTAPE_METRICS_TOKEN", "str"),
    "log_level": ("BONDTAPE_LOG_LEVEL", "level"),
    "log_format": ("BONDTAPE_LOG_FORMAT", "format"),
    "shutdown_timeout": ("BONDTAPE_SHUTDOWN_TIMEOUT", "seconds"),
    "feed_poll_interval": ("BONDTAPE_FEED_POLL_INTERVAL", "seconds"),
}
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "text")


def _convert(key: str, value: Any) -> Any:
    if key not in KEYS:
        raise ConfigError("CONFIG_UNKNOWN_KEY", key, f"unknown setting; the settings are: {', '.join(KEYS)}")
    kind = KEYS[key][1]
    if value is None or (isinstance(value, str) and value == "" and kind != "str"):
        return None
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value or None
        if kind == "path":
            return Path(str(value))
        if kind == "port":
            port = int(value)
            if not 0 <= port <= 65535 or isinstance(value, bool):
                raise ValueError
            return port
        if kind == "workers":
            n = int(value)
            if not 1 <= n <= 64 or isinstance(value, bool):
                raise ValueError
            return n
        if kind == "seconds":
            s = float(value)
            if not 0 < s <= 3600:
                raise ValueError
            return s
        if kind in ("level", "format"):
            choices = LEVELS if kind == "level" else FORMATS
            if str(value).lower() not in choices:
                raise ValueError
            return str(value).lower()
    except (TypeError, ValueError):
        pass
    accepted = {"str": "a string", "path": "a file or folder path", "port": "a port number 0 to 65535",
                "workers": "a whole number 1 to 64", "seconds": "seconds, more than 0 and at most 3600",
                "level": " | ".join(LEVELS), "format": " | ".join(FORMATS)}[kind]
    raise ConfigError("CONFIG_INVALID", key, f"{value!r} is not accepted; expected {accepted}")


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> ServeConfig:
    """File, then environment, then ``overrides`` (None values are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("CONFIG_FILE", str(path), "no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("CONFIG_FILE", str(path), f"not valid TOML: {exc}") from None
        table = data.get("serve", {})
        unknown_tables = set(data) - {"serve"}
        if unknown_tables or not isinstance(table, dict):
            raise ConfigError("CONFIG_UNKNOWN_KEY", ", ".join(sorted(unknown_tables)) or "serve",
                              "the file holds one table, [serve]")
        for key, value in table.items():
            values[key] = _convert(key, value)
    env = os.environ if env is None else env
    for key, (var, _) in KEYS.items():
        if env.get(var) not in (None, ""):
            values[key] = _convert(key, env[var])
    for key, value in overrides.items():
        if value is not None:
            values[key] = _convert(key, value)
    cfg = ServeConfig(**values)
    if cfg.workers > 1 and (cfg.database_url or "sqlite").startswith("sqlite"):
        raise ConfigError("CONFIG_INVALID", "workers", "several workers need PostgreSQL (SQLite has one writer)")
    if cfg.tls_port is not None and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError("CONFIG_INVALID", "tls_port", "HTTPS needs tls_cert and tls_key")
    return cfg
