"""Fail-fast check of a DVC remote: one request, no retries, a clear verdict in seconds.

``dvc pull`` against an S3 endpoint that accepts connections and never answers takes about
2 minutes to fail (DVC looks a directory output up 4 times, and s3fs tries every request 5 times
with ``read_timeout`` each; neither count is configurable). ``llmpipe remote check`` asks the
remote once, with the remote's own endpoint, credentials and timeouts and botocore retries off,
and says what is wrong: nothing listens, the connection hangs, the server never answers, the
credentials are refused, the bucket is missing. Run it before ``dvc pull``/``dvc push`` in CI
(the shipped workflow does) and in scripts.

The remote's settings are read from ``.dvc/config`` and ``.dvc/config.local`` (the latter wins),
the files ``dvc remote add/modify [--local]`` writes; DVC itself is not imported.
"""

from __future__ import annotations

import configparser
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_TIMEOUT_S = 10.0


class RemoteCheckError(RuntimeError):
    """The remote cannot be used; the message says why and what to check."""


@dataclass(frozen=True)
class RemoteCheck:
    name: str
    url: str
    seconds: float
    detail: str


def read_remote_config(repo: Path, name: str | None = None) -> tuple[str, dict[str, str]]:
    """Return (remote name, its settings) from the repo's DVC config; ``name`` None: the default remote."""
    parser = configparser.ConfigParser(interpolation=None)
    files = [repo / ".dvc" / "config", repo / ".dvc" / "config.local"]
    parser.read([f for f in files if f.is_file()], encoding="utf-8")
    if name is None:
        name = parser.get("core", "remote", fallback=None)
        if not name:
            raise RemoteCheckError("no default DVC remote (set one with `dvc remote default NAME`) and none given")
    section = f"'remote \"{name}\"'"
    if not parser.has_section(section):
        known = [s.split('"')[1] for s in parser.sections() if s.startswith("'remote ")]
        raise RemoteCheckError(f"DVC remote {name!r} is not configured (known: {', '.join(known) or 'none'})")
    return name, dict(parser.items(section))


def _seconds(value: str | None, cap: float) -> float:
    return min(float(value), cap) if value else cap


def check_remote(repo: Path, name: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> RemoteCheck:
    """Check that the remote answers and accepts the credentials; raise RemoteCheckError otherwise."""
    name, cfg = read_remote_config(repo, name)
    url = cfg.get("url", "")
    scheme = urlparse(url).scheme
    t0 = time.monotonic()
    if scheme == "s3":
        detail = _check_s3(url, cfg, timeout_s)
    elif scheme in ("", "file"):
        detail = _check_local(repo, url)
    else:
        detail = f"no check for {scheme}:// remotes (skipped)"
    return RemoteCheck(name, url, round(time.monotonic() - t0, 2), detail)


def _check_local(repo: Path, url: str) -> str:
    path = Path(urlparse(url).path if url.startswith("file:") else url)
    path = path if path.is_absolute() else (repo / ".dvc" / path).resolve()   # DVC: relative to .dvc/
    probe = path if path.exists() else path.parent
    if not probe.is_dir():
        raise RemoteCheckError(f"local remote {path}: neither it nor its parent directory exists")
    return f"local directory {path}" + ("" if path.exists() else " (created on the first push)")


def _ssl_verify(value: str | None) -> bool | str | None:
    """DVC's ``ssl_verify``: true/false or the path of a CA bundle; None: botocore's default."""
    if value is None:
        return None
    low = value.strip().lower()
    return True if low in ("true", "1", "yes") else False if low in ("false", "0", "no") else value


def _check_s3(url: str, cfg: dict[str, str], timeout_s: float) -> str:
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, ReadTimeoutError)

    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    endpoint = cfg.get("endpointurl")
    where = endpoint or "AWS S3"
    connect_s = _seconds(cfg.get("connect_timeout"), timeout_s)
    read_s = _seconds(cfg.get("read_timeout"), timeout_s)
    session = botocore.session.Session(profile=cfg.get("profile"))
    client = session.create_client(
        "s3", region_name=cfg.get("region") or "us-east-1", endpoint_url=endpoint,
        aws_access_key_id=cfg.get("access_key_id"), aws_secret_access_key=cfg.get("secret_access_key"),
        aws_session_token=cfg.get("session_token"),
        verify=_ssl_verify(cfg.get("ssl_verify")),
        config=Config(connect_timeout=connect_s, read_timeout=read_s,
                      retries={"total_max_attempts": 1, "mode": "standard"}))
    try:
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except EndpointConnectionError as exc:
        raise RemoteCheckError(f"could not connect to {where}: nothing accepts connections there ({exc})") from None
    except ConnectTimeoutError:
        raise RemoteCheckError(f"connect timeout after {connect_s:g} s on {where}: the endpoint does not "
                               "complete connections (firewall, wrong host or port, VPN down?)") from None
    except ReadTimeoutError:
        raise RemoteCheckError(f"read timeout after {read_s:g} s on {where}: the endpoint accepts connections "
                               "but does not answer (a proxy or a stuck server?)") from None
    except NoCredentialsError:
        raise RemoteCheckError(f"no credentials for {url}: set them with `dvc remote modify --local "
                               "<remote> access_key_id/secret_access_key` or the AWS_* variables") from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code, status = err.get("Code", "?"), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise RemoteCheckError(f"bucket {bucket!r} does not exist at {where}") from None
        if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise RemoteCheckError(f"{where} refused the credentials for s3://{bucket}: {status} {code} "
                                   f"({err.get('Message', '')})") from None
        raise RemoteCheckError(f"{where} answered {status} {code}: {err.get('Message', '')}") from None
    found = "objects" if resp.get("KeyCount", 0) else "no objects yet"
    return f"s3://{bucket}/{prefix} at {where}: reachable, credentials accepted, {found} under the prefix"
