"""huggingface_hub's own exceptions, built the way the installed version builds them (0.34 uses requests; 1.x
and later httpx / httpx2), so the hub tests run on the declared minimum version too."""

from __future__ import annotations

from typing import Any

from huggingface_hub import errors

HUB_URL = "https://huggingface.co/nvidia/PiD"


def _http_module() -> Any:
    for name in ("httpx2", "httpx"):
        try:
            return __import__(name)
        except ImportError:
            continue
    return None


def http_response(status: int, url: str = HUB_URL) -> Any:
    """A response object of the kind HfHubHTTPError takes in this huggingface_hub version."""
    import inspect

    uses_requests = "requests" in inspect.getsource(errors).split("class HfHubHTTPError")[0]
    http = None if uses_requests else _http_module()
    if http is not None:
        return http.Response(status, request=http.Request("GET", url))
    import requests

    response = requests.Response()
    response.status_code, response.url = status, url
    response.request = requests.Request("GET", url).prepare()
    return response


def entry_not_found(message: str = "404 entry") -> BaseException:
    cls = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    return cls(message, response=http_response(404))


def connect_error(message: str = "connection refused") -> BaseException:
    http = _http_module()
    if http is not None and hasattr(http, "ConnectError"):
        return http.ConnectError(message)
    import requests

    return requests.ConnectionError(message)
