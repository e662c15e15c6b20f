"""The error a simulated endpoint raises; rendered as Salesforce's JSON error array."""

from __future__ import annotations

from typing import Any

__all__ = ["SalesforceError"]


class SalesforceError(Exception):
    """An API error: HTTP ``status`` and the body ``[{"message", "errorCode", "fields"?}]``."""

    def __init__(self, status: int, error_code: str, message: str, fields: list[str] | None = None) -> None:
        super().__init__(f"{error_code}: {message}")
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields

    def body(self) -> list[dict[str, Any]]:
        item: dict[str, Any] = {"message": self.message, "errorCode": self.error_code}
        if self.fields is not None:
            item["fields"] = self.fields
        return [item]
