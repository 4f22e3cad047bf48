"""The failures of an XNAT request, as the deliverer acts on them.

An `XnatError` says whether trying again later can help (`retryable`) and, when it cannot, which hold it is
(`code`, explained in docs/xnat.md). An `XnatLoginError` is a refused account: the deliverer pauses the whole
server instead of retrying (ingestd.pipeline.breaker).
"""

from __future__ import annotations

from ingestd.errors import IngestdError
from ingestd.states import HoldCode


class XnatError(IngestdError):
    """A failed XNAT request. `retryable`: the same request may succeed later; otherwise a person must act, and
    `code` names the hold (docs/xnat.md says what to do for each)."""

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, code: HoldCode = HoldCode.XNAT_REFUSED
    ) -> None:
        self.retryable = retryable
        self.status = status
        self.code = code
        super().__init__(message)


class XnatLoginError(XnatError):
    """XNAT refused this account: wrong credentials, a locked account, an expired password or alias token, a
    disabled account. Trying again cannot help until a person fixes the account or the credentials, and trying
    too often locks the account (`security.max_failed_logins`): the deliverer pauses the server instead."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, retryable=False, status=status, code=HoldCode.XNAT_LOGIN_REFUSED)
