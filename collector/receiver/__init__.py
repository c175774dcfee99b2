"""OTLP receivers (gRPC and HTTP) with span validation, peer resolution and transport security."""

from collector.receiver.grpc_server import OtlpGrpcReceiver
from collector.receiver.http_server import OtlpHttpReceiver
from collector.receiver.limits import (
    BodyTooLarge,
    BoundedDecoder,
    CorruptBody,
    UnsupportedEncoding,
    decode_body,
)
from collector.receiver.peer import PeerResolver
from collector.receiver.security import ReceiverSecurity, SecurityConfigError
from collector.receiver.validate import MAX_ANYVALUE_DEPTH, ValidationResult, validate_request

__all__ = [
    "OtlpGrpcReceiver", "OtlpHttpReceiver", "PeerResolver", "ReceiverSecurity",
    "SecurityConfigError", "ValidationResult", "validate_request", "MAX_ANYVALUE_DEPTH",
    "BoundedDecoder", "BodyTooLarge", "CorruptBody", "UnsupportedEncoding", "decode_body",
]
