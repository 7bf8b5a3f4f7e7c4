from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_ip", "timeout_s")
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    node_ip: str
    timeout_s: float
    def __init__(self, node_ip: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WorkerDrain(_message.Message):
    __slots__ = ("pool", "worker_id", "left_empty")
    POOL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEFT_EMPTY_FIELD_NUMBER: _ClassVar[int]
    pool: str
    worker_id: str
    left_empty: bool
    def __init__(self, pool: _Optional[str] = ..., worker_id: _Optional[str] = ..., left_empty: _Optional[bool] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node_ip", "completed", "workers", "replacement_worker_ids", "num_replacements_failed", "already_draining", "elapsed_s", "num_replacements_pending")
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLACEMENTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_DRAINING_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLACEMENTS_PENDING_FIELD_NUMBER: _ClassVar[int]
    node_ip: str
    completed: bool
    workers: _containers.RepeatedCompositeFieldContainer[WorkerDrain]
    replacement_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    num_replacements_failed: int
    already_draining: bool
    elapsed_s: float
    num_replacements_pending: int
    def __init__(self, node_ip: _Optional[str] = ..., completed: _Optional[bool] = ..., workers: _Optional[_Iterable[_Union[WorkerDrain, _Mapping]]] = ..., replacement_worker_ids: _Optional[_Iterable[str]] = ..., num_replacements_failed: _Optional[int] = ..., already_draining: _Optional[bool] = ..., elapsed_s: _Optional[float] = ..., num_replacements_pending: _Optional[int] = ...) -> None: ...
