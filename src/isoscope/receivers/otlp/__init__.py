"""OTLP receivers (gRPC and HTTP): traces with span validation and peer resolution, metrics and logs
passed through; transport security for all."""

from isoscope.receivers.otlp.grpc_server import OtlpGrpcReceiver
from isoscope.receivers.otlp.http_server import OtlpHttpReceiver
from isoscope.receivers.otlp.limits import (
    BodyTooLarge,
    BoundedDecoder,
    CorruptBody,
    LimitChecker,
    RequestLimits,
    RequestOverLimit,
    UnsupportedEncoding,
    decode_body,
    memory_estimate,
)
from isoscope.metadata.peer import PeerResolver
from isoscope.receivers.otlp.passthrough import ForwardSignal, PassThrough
from isoscope.receivers.otlp.security import ReceiverSecurity, SecurityConfigError
from isoscope.receivers.otlp.validate import MAX_ANYVALUE_DEPTH, ValidationResult, validate_request

__all__ = [
    "OtlpGrpcReceiver", "OtlpHttpReceiver", "PeerResolver", "ReceiverSecurity",
    "SecurityConfigError", "ValidationResult", "validate_request", "MAX_ANYVALUE_DEPTH",
    "BoundedDecoder", "BodyTooLarge", "CorruptBody", "UnsupportedEncoding", "decode_body",
    "RequestLimits", "RequestOverLimit", "LimitChecker", "memory_estimate", "ForwardSignal", "PassThrough",
]
