"""The XNAT REST client: the client (`client`), its failures (`errors`), credentials (`credentials`) and the
reading of XNAT's answers (`responses`). The names the rest of ingestd uses are imported from here."""

from ingestd.xnat.client import XnatClient
from ingestd.xnat.credentials import is_alias_token, load_credentials, save_credentials_file
from ingestd.xnat.errors import XnatError, XnatLoginError
from ingestd.xnat.responses import Holdings, PrearchiveRow, TokenInfo

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
