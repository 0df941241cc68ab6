"""Reading the google.rpc rich status a gRPC server sends in the ``grpc-status-details-bin``
trailer. Shared by the OTLP exporter (RetryInfo from backends) and the Dapr instrumentor
(ErrorInfo from daprd)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def status_details(trailers: Iterable[tuple[str, Any]] | None, detail_type: type[T]) -> Iterator[T]:
    """Each detail of ``detail_type`` (a google.rpc.error_details_pb2 message class) in the rich
    status among ``trailers``, in the order the server sent them."""
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            from google.rpc import status_pb2

            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(detail_type.DESCRIPTOR):  # type: ignore[attr-defined]
                    found = detail_type()
                    detail.Unpack(found)  # type: ignore[arg-type]
                    yield found
