"""Opening shard URLs through fsspec (local, s3://, gs://, http(s)://) with timeouts always set.

S3 settings come from `data.s3` in the config, else from the environment (the usual AWS
variables). Credentials are never config keys and never appear in messages or logs: they
come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), a profile, or
botocore's default chain. `describe()` says which source is used, without values.

Filesystems are created lazily per process (DataLoader workers fork; an s3fs/aiohttp event
loop must not be shared across a fork) and cached by settings.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec

REMOTE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "http", "https")


@dataclass(frozen=True)
class StorageSettings:
    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    addressing_style: str = "auto"
    anonymous: bool = False
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    block_size: int = 8 * 2**20  # bytes per ranged GET

    @classmethod
    def from_config(cls, data_cfg: Any) -> StorageSettings:
        """DataConfig -> settings, filling blanks from the environment."""
        s3 = data_cfg.s3
        env = os.environ
        return cls(
            endpoint_url=s3.endpoint_url or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", ""),
            region=s3.region or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", ""),
            profile=s3.profile or env.get("AWS_PROFILE", ""),
            addressing_style=s3.addressing_style,
            anonymous=s3.anonymous,
            connect_timeout_s=data_cfg.connect_timeout_s,
            read_timeout_s=data_cfg.read_timeout_s,
        )

    def describe(self) -> str:
        """One log line about the S3 setup, without any secret."""
        if self.anonymous:
            creds = "anonymous"
        elif os.environ.get("AWS_ACCESS_KEY_ID"):
            creds = "keys from environment"
        elif self.profile:
            creds = f"profile {self.profile!r}"
        else:
            creds = "botocore default chain"
        return (
            f"s3 endpoint={self.endpoint_url or 'AWS default'} region={self.region or 'default'} "
            f"addressing={self.addressing_style} credentials={creds} "
            f"timeouts connect={self.connect_timeout_s}s read={self.read_timeout_s}s"
        )


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_remote(url: str) -> bool:
    return protocol_of(url) in REMOTE_PROTOCOLS


_CACHE: dict[tuple[int, str, StorageSettings, str], fsspec.AbstractFileSystem] = {}
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


def _credentials_digest() -> str:
    """Changes when the credentials in the environment change (a digest: no secret is kept)."""
    import hashlib

    joined = "\0".join(os.environ.get(name, "") for name in _CREDENTIAL_VARS)
    return hashlib.sha256(joined.encode()).hexdigest()


def filesystem(url: str, settings: StorageSettings) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `url`'s protocol, built once per process, settings and credentials."""
    protocol = protocol_of(url)
    key = (os.getpid(), protocol, settings, _credentials_digest())
    fs = _CACHE.get(key)
    if fs is None:
        fs = _make_filesystem(protocol, settings)
        _CACHE[key] = fs
    return fs


def _make_filesystem(protocol: str, s: StorageSettings) -> fsspec.AbstractFileSystem:
    if protocol in ("s3", "s3a"):
        import s3fs

        kwargs: dict[str, Any] = {}
        if s.profile and not s.anonymous:
            kwargs["profile"] = s.profile
        fs = s3fs.S3FileSystem(
            anon=s.anonymous,
            endpoint_url=s.endpoint_url or None,
            client_kwargs={"region_name": s.region} if s.region else {},
            config_kwargs={
                "connect_timeout": s.connect_timeout_s,
                "read_timeout": s.read_timeout_s,
                # Retries are ours (shards.RetryingStream: backoff + jitter, counted).
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "s3": {"addressing_style": s.addressing_style},
            },
            default_block_size=s.block_size,
            skip_instance_cache=True,
            **kwargs,
        )
        fs.retries = 1  # s3fs's own retry loop is silent and unbounded in time: disable it
        return fs
    if protocol in ("http", "https", "gs", "gcs"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
        if protocol.startswith("http"):
            return fsspec.filesystem(protocol, client_kwargs={"timeout": timeout}, skip_instance_cache=True)
        try:  # gcsfs hands requests_timeout to every aiohttp request (untested here: no GCS emulator)
            return fsspec.filesystem(protocol, requests_timeout=timeout, skip_instance_cache=True)
        except ImportError as err:
            raise ImportError("gs:// shards need gcsfs: pip install gcsfs") from err
    return fsspec.filesystem("file")


def strip_protocol(url: str) -> str:
    return url.split("://", 1)[1] if protocol_of(url) in ("file",) and "://" in url else url


def open_at(url: str, offset: int, settings: StorageSettings) -> BinaryIO:
    """Open `url` for sequential reading from byte `offset` (a ranged read on object stores)."""
    fs = filesystem(url, settings)
    if is_remote(url):
        handle = fs.open(url, "rb", block_size=settings.block_size, cache_type="readahead")
    else:
        handle = open(strip_protocol(url), "rb")  # noqa: SIM115 (caller closes)
    if offset:
        handle.seek(offset)
    return handle


def size_of(url: str, settings: StorageSettings) -> int:
    """Byte size of `url`; raises FileNotFoundError / PermissionError (preflight checks)."""
    if not is_remote(url):
        return os.path.getsize(strip_protocol(url))
    info = filesystem(url, settings).info(url)
    return int(info.get("size") or 0)


def register_webdataset_opener(settings: StorageSettings, policy: Any = None) -> None:
    """Make webdataset open s3:// gs:// http(s):// URLs through fsspec (with our timeouts and
    retrying reads) instead of its curl/gsutil subprocess pipes, e.g. for evaluation code
    that uses `webdataset.WebDataset(url)`. The training loader does not need this."""
    import sys

    import webdataset  # noqa: F401 (loads the gopen module)

    from clipa_ds.data.shards import RetryingStream, RetryPolicy

    gopen = sys.modules["webdataset.gopen"]
    retry = policy or RetryPolicy()

    def opener(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
        if mode != "rb":
            return filesystem(url, settings).open(url, mode)
        stream = RetryingStream(url, 0, lambda u, o: open_at(u, o, settings), retry)
        return io.BufferedReader(_RawAdapter(stream), buffer_size=max(bufsize, 1 << 20))  # type: ignore[arg-type]

    for scheme in ("s3", "s3a", "gs", "gcs", "http", "https"):
        gopen.gopen_schemes[scheme] = opener


class _RawAdapter(io.RawIOBase):
    """io.RawIOBase over a `read(n)` object, so it can sit under a BufferedReader."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()
