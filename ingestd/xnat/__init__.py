"""The XNAT REST client (`ingestd.xnat.client`); the names the rest of ingestd imports are re-exported here."""

from ingestd.xnat.client import (
    Holdings,
    PrearchiveRow,
    TokenInfo,
    XnatClient,
    XnatError,
    XnatLoginError,
    is_alias_token,
    load_credentials,
    save_credentials_file,
)

__all__ = [
    "Holdings",
    "PrearchiveRow",
    "TokenInfo",
    "XnatClient",
    "XnatError",
    "XnatLoginError",
    "is_alias_token",
    "load_credentials",
    "save_credentials_file",
]
