"""A client of a host's REST API over its Unix socket (httpx), for the CLI and tests."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx


class ApiError(Exception):
    """The host refused a request (its JSON error body) or could not be reached."""

    def __init__(self, status: int, code: int | None, name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.name = name
        self.message = message


class HostClient:
    def __init__(self, socket_path: str | Path, *, timeout: float = 90.0) -> None:
        self.socket_path = Path(socket_path)
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)),
                                  base_url="http://host", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None) -> Any:
        try:
            # (an empty params mapping would drop a query string written in ``path``)
            resp = self._http.request(method, path, json=json, params=params or None)
        except httpx.TransportError as exc:
            raise ApiError(0, None, "UNREACHABLE",
                           f"no host answers at {self.socket_path}: {exc}") from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise ApiError(resp.status_code, err.get("code"), err.get("name", ""),
                               err.get("message", resp.text))
            except (ValueError, KeyError, TypeError):
                raise ApiError(resp.status_code, None, "", resp.text) from None
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
