from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_CURRENT: _ClassVar[ProtocolVersion]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    CLIENT_HELLO: _ClassVar[Kind]
    SERVER_HELLO: _ClassVar[Kind]
    JOIN_ROUND: _ClassVar[Kind]
    ROUND_PLAN: _ClassVar[Kind]
    CLIENT_UPDATE: _ClassVar[Kind]
    UPDATE_ACK: _ClassVar[Kind]
    FORWARD: _ClassVar[Kind]
    FORWARD_RESULT: _ClassVar[Kind]
    BACKWARD: _ClassVar[Kind]
    BACKWARD_RESULT: _ClassVar[Kind]
    OPTIMIZER_STEP: _ClassVar[Kind]
    OPTIMIZER_RESULT: _ClassVar[Kind]
    EVAL_REPORT: _ClassVar[Kind]
    EVAL_ACK: _ClassVar[Kind]
    AGG_ADVERTISE: _ClassVar[Kind]
    AGG_KEYS_BROADCAST: _ClassVar[Kind]
    AGG_SHARE_KEYS: _ClassVar[Kind]
    AGG_SHARES: _ClassVar[Kind]
    AGG_MASKED_INPUT: _ClassVar[Kind]
    AGG_UNMASK_REQUEST: _ClassVar[Kind]
    AGG_UNMASK_RESPONSE: _ClassVar[Kind]
    AGG_ACK: _ClassVar[Kind]
    AGG_CKKS_ADVERTISE: _ClassVar[Kind]
    AGG_CKKS_KEY: _ClassVar[Kind]
    AGG_CKKS_HOLDER: _ClassVar[Kind]
    AGG_CKKS_PENDING: _ClassVar[Kind]
    AGG_CKKS_UPLOAD: _ClassVar[Kind]
    AGG_CKKS_SUM: _ClassVar[Kind]
    AGG_CKKS_DECRYPTED: _ClassVar[Kind]
    GENERATE_PREFILL: _ClassVar[Kind]
    GENERATE_STEP: _ClassVar[Kind]
    GENERATE_RESULT: _ClassVar[Kind]
    GENERATE_END: _ClassVar[Kind]
    GENERATE_ENDED: _ClassVar[Kind]
    ERROR: _ClassVar[Kind]
    GOODBYE: _ClassVar[Kind]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    BAD_REQUEST: _ClassVar[ErrorCode]
    UNAUTHENTICATED: _ClassVar[ErrorCode]
    PERMISSION_DENIED: _ClassVar[ErrorCode]
    FAILED_PRECONDITION: _ClassVar[ErrorCode]
    RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ABORTED: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_CURRENT: ProtocolVersion
KIND_UNSPECIFIED: Kind
CLIENT_HELLO: Kind
SERVER_HELLO: Kind
JOIN_ROUND: Kind
ROUND_PLAN: Kind
CLIENT_UPDATE: Kind
UPDATE_ACK: Kind
FORWARD: Kind
FORWARD_RESULT: Kind
BACKWARD: Kind
BACKWARD_RESULT: Kind
OPTIMIZER_STEP: Kind
OPTIMIZER_RESULT: Kind
EVAL_REPORT: Kind
EVAL_ACK: Kind
AGG_ADVERTISE: Kind
AGG_KEYS_BROADCAST: Kind
AGG_SHARE_KEYS: Kind
AGG_SHARES: Kind
AGG_MASKED_INPUT: Kind
AGG_UNMASK_REQUEST: Kind
AGG_UNMASK_RESPONSE: Kind
AGG_ACK: Kind
AGG_CKKS_ADVERTISE: Kind
AGG_CKKS_KEY: Kind
AGG_CKKS_HOLDER: Kind
AGG_CKKS_PENDING: Kind
AGG_CKKS_UPLOAD: Kind
AGG_CKKS_SUM: Kind
AGG_CKKS_DECRYPTED: Kind
GENERATE_PREFILL: Kind
GENERATE_STEP: Kind
GENERATE_RESULT: Kind
GENERATE_END: Kind
GENERATE_ENDED: Kind
ERROR: Kind
GOODBYE: Kind
ERROR_CODE_UNSPECIFIED: ErrorCode
BAD_REQUEST: ErrorCode
UNAUTHENTICATED: ErrorCode
PERMISSION_DENIED: ErrorCode
FAILED_PRECONDITION: ErrorCode
RESOURCE_EXHAUSTED: ErrorCode
ABORTED: ErrorCode
INTERNAL: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("protocol_version", "kind", "round", "step", "seq", "body", "chunk_index", "chunk_count")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    kind: Kind
    round: int
    step: int
    seq: int
    body: bytes
    chunk_index: int
    chunk_count: int
    def __init__(self, protocol_version: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., seq: _Optional[int] = ..., body: _Optional[bytes] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class ClientHello(_message.Message):
    __slots__ = ("protocol_version", "run_id", "client_id", "identity_key", "ephemeral_key", "nonce", "timestamp", "config_hash", "signature", "config_sections")
    class ConfigSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: str
    client_id: str
    identity_key: bytes
    ephemeral_key: bytes
    nonce: bytes
    timestamp: float
    config_hash: bytes
    signature: bytes
    config_sections: _containers.ScalarMap[str, bytes]
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., client_id: _Optional[str] = ..., identity_key: _Optional[bytes] = ..., ephemeral_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., timestamp: _Optional[float] = ..., config_hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., config_sections: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class ServerHello(_message.Message):
    __slots__ = ("ephemeral_key", "nonce", "timestamp", "signature", "session_id")
    EPHEMERAL_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ephemeral_key: bytes
    nonce: bytes
    timestamp: float
    signature: bytes
    session_id: str
    def __init__(self, ephemeral_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., timestamp: _Optional[float] = ..., signature: _Optional[bytes] = ..., session_id: _Optional[str] = ...) -> None: ...

class JoinRound(_message.Message):
    __slots__ = ("last_round", "num_examples", "data_report")
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_REPORT_FIELD_NUMBER: _ClassVar[int]
    last_round: int
    num_examples: int
    data_report: DataReport
    def __init__(self, last_round: _Optional[int] = ..., num_examples: _Optional[int] = ..., data_report: _Optional[_Union[DataReport, _Mapping]] = ...) -> None: ...

class DataReport(_message.Message):
    __slots__ = ("num_examples", "label_histogram", "num_truncated", "num_rejected", "rejected", "contract_hash")
    class LabelHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    NUM_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_HASH_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    label_histogram: _containers.ScalarMap[str, int]
    num_truncated: int
    num_rejected: int
    rejected: _containers.ScalarMap[str, int]
    contract_hash: str
    def __init__(self, num_examples: _Optional[int] = ..., label_histogram: _Optional[_Mapping[str, int]] = ..., num_truncated: _Optional[int] = ..., num_rejected: _Optional[int] = ..., rejected: _Optional[_Mapping[str, int]] = ..., contract_hash: _Optional[str] = ...) -> None: ...

class RoundPlan(_message.Message):
    __slots__ = ("round", "finished", "local_steps", "lr", "adapters", "settings", "first_step", "wait_s", "evaluate")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    finished: bool
    local_steps: int
    lr: float
    adapters: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    settings: _containers.ScalarMap[str, str]
    first_step: int
    wait_s: float
    evaluate: bool
    def __init__(self, round: _Optional[int] = ..., finished: _Optional[bool] = ..., local_steps: _Optional[int] = ..., lr: _Optional[float] = ..., adapters: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., settings: _Optional[_Mapping[str, str]] = ..., first_step: _Optional[int] = ..., wait_s: _Optional[float] = ..., evaluate: _Optional[bool] = ...) -> None: ...

class ClientUpdate(_message.Message):
    __slots__ = ("round", "adapters", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    adapters: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("round", "accepted", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    reason: str
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("round", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvalAck(_message.Message):
    __slots__ = ("round", "accepted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("hidden", "attention_mask", "position_ids", "train")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    train: bool
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., train: _Optional[bool] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("grad",)
    GRAD_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardResult(_message.Message):
    __slots__ = ("grad",)
    GRAD_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OptimizerStep(_message.Message):
    __slots__ = ("client_grad_sq_norm",)
    CLIENT_GRAD_SQ_NORM_FIELD_NUMBER: _ClassVar[int]
    client_grad_sq_norm: float
    def __init__(self, client_grad_sq_norm: _Optional[float] = ...) -> None: ...

class OptimizerResult(_message.Message):
    __slots__ = ("total_grad_norm", "clip_coef", "server_step")
    TOTAL_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEF_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    total_grad_norm: float
    clip_coef: float
    server_step: int
    def __init__(self, total_grad_norm: _Optional[float] = ..., clip_coef: _Optional[float] = ..., server_step: _Optional[int] = ...) -> None: ...

class GeneratePrefill(_message.Message):
    __slots__ = ("request_id", "hidden", "attention_mask", "position_ids", "max_new_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    hidden: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    max_new_tokens: int
    def __init__(self, request_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateStep(_message.Message):
    __slots__ = ("request_id", "hidden", "position_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    hidden: Tensor
    position_ids: Tensor
    def __init__(self, request_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("request_id", "hidden", "cached_length")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    hidden: Tensor
    cached_length: int
    def __init__(self, request_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., cached_length: _Optional[int] = ...) -> None: ...

class GenerateEnd(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class GenerateEnded(_message.Message):
    __slots__ = ("request_id", "found")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    found: bool
    def __init__(self, request_id: _Optional[int] = ..., found: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class AggSignedKeys(_message.Message):
    __slots__ = ("client_id", "purpose", "round", "keys", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    purpose: str
    round: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., purpose: _Optional[str] = ..., round: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AggAdvertiseKeys(_message.Message):
    __slots__ = ("round", "advert")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    round: int
    advert: AggSignedKeys
    def __init__(self, round: _Optional[int] = ..., advert: _Optional[_Union[AggSignedKeys, _Mapping]] = ...) -> None: ...

class AggKeysBroadcast(_message.Message):
    __slots__ = ("wait_s", "adverts", "num_clients", "weight")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    ADVERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    adverts: _containers.RepeatedCompositeFieldContainer[AggSignedKeys]
    num_clients: int
    weight: int
    def __init__(self, wait_s: _Optional[float] = ..., adverts: _Optional[_Iterable[_Union[AggSignedKeys, _Mapping]]] = ..., num_clients: _Optional[int] = ..., weight: _Optional[int] = ...) -> None: ...

class AggShare(_message.Message):
    __slots__ = ("sender", "recipient", "sealed")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    sealed: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class AggShareKeys(_message.Message):
    __slots__ = ("round", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[AggShare]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[AggShare, _Mapping]]] = ...) -> None: ...

class AggShares(_message.Message):
    __slots__ = ("wait_s", "shares")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    shares: _containers.RepeatedCompositeFieldContainer[AggShare]
    def __init__(self, wait_s: _Optional[float] = ..., shares: _Optional[_Iterable[_Union[AggShare, _Mapping]]] = ...) -> None: ...

class AggMaskedInput(_message.Message):
    __slots__ = ("round", "data", "masked_with", "rejected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MASKED_WITH_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    data: bytes
    masked_with: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., data: _Optional[bytes] = ..., masked_with: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ...) -> None: ...

class AggUnmaskRequest(_message.Message):
    __slots__ = ("wait_s", "survivors", "dropped")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, wait_s: _Optional[float] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class AggUnmaskResponse(_message.Message):
    __slots__ = ("round", "self_shares", "key_shares", "refused")
    class SelfSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELF_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    round: int
    self_shares: _containers.ScalarMap[str, bytes]
    key_shares: _containers.ScalarMap[str, bytes]
    refused: str
    def __init__(self, round: _Optional[int] = ..., self_shares: _Optional[_Mapping[str, bytes]] = ..., key_shares: _Optional[_Mapping[str, bytes]] = ..., refused: _Optional[str] = ...) -> None: ...

class AggAck(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AggCkksAdvertise(_message.Message):
    __slots__ = ("round", "advert", "key_id")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    round: int
    advert: AggSignedKeys
    key_id: bytes
    def __init__(self, round: _Optional[int] = ..., advert: _Optional[_Union[AggSignedKeys, _Mapping]] = ..., key_id: _Optional[bytes] = ...) -> None: ...

class AggCkksKey(_message.Message):
    __slots__ = ("wait_s", "holder", "holder_advert", "sealed", "key_id", "num_clients", "weight")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ADVERT_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    holder: str
    holder_advert: AggSignedKeys
    sealed: bytes
    key_id: bytes
    num_clients: int
    weight: int
    def __init__(self, wait_s: _Optional[float] = ..., holder: _Optional[str] = ..., holder_advert: _Optional[_Union[AggSignedKeys, _Mapping]] = ..., sealed: _Optional[bytes] = ..., key_id: _Optional[bytes] = ..., num_clients: _Optional[int] = ..., weight: _Optional[int] = ...) -> None: ...

class AggSealedKey(_message.Message):
    __slots__ = ("holder", "recipient", "sealed")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    holder: str
    recipient: str
    sealed: bytes
    def __init__(self, holder: _Optional[str] = ..., recipient: _Optional[str] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class AggCkksHolder(_message.Message):
    __slots__ = ("round", "advert", "public_context", "key_id", "sealed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    round: int
    advert: AggSignedKeys
    public_context: bytes
    key_id: bytes
    sealed: _containers.RepeatedCompositeFieldContainer[AggSealedKey]
    def __init__(self, round: _Optional[int] = ..., advert: _Optional[_Union[AggSignedKeys, _Mapping]] = ..., public_context: _Optional[bytes] = ..., key_id: _Optional[bytes] = ..., sealed: _Optional[_Iterable[_Union[AggSealedKey, _Mapping]]] = ...) -> None: ...

class AggCkksPending(_message.Message):
    __slots__ = ("wait_s", "adverts", "done")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    ADVERTS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    adverts: _containers.RepeatedCompositeFieldContainer[AggSignedKeys]
    done: bool
    def __init__(self, wait_s: _Optional[float] = ..., adverts: _Optional[_Iterable[_Union[AggSignedKeys, _Mapping]]] = ..., done: _Optional[bool] = ...) -> None: ...

class AggCkksUpload(_message.Message):
    __slots__ = ("round", "key_id", "blocks", "signature")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    key_id: bytes
    blocks: _containers.RepeatedScalarFieldContainer[bytes]
    signature: bytes
    def __init__(self, round: _Optional[int] = ..., key_id: _Optional[bytes] = ..., blocks: _Optional[_Iterable[bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AggCkksSum(_message.Message):
    __slots__ = ("wait_s", "blocks", "clients")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    blocks: _containers.RepeatedScalarFieldContainer[bytes]
    clients: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, wait_s: _Optional[float] = ..., blocks: _Optional[_Iterable[bytes]] = ..., clients: _Optional[_Iterable[str]] = ...) -> None: ...

class AggCkksDecrypted(_message.Message):
    __slots__ = ("round", "sum")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    round: int
    sum: Tensor
    def __init__(self, round: _Optional[int] = ..., sum: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
