from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scorer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORER_UNSPECIFIED: _ClassVar[Scorer]
    SCORER_TRITON_INT8: _ClassVar[Scorer]
    SCORER_TRITON_FP32: _ClassVar[Scorer]
    SCORER_IN_PROCESS: _ClassVar[Scorer]
    SCORER_FALLBACK_IN_PROCESS: _ClassVar[Scorer]

class Retrieval(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_UNSPECIFIED: _ClassVar[Retrieval]
    RETRIEVAL_PERSONAL: _ClassVar[Retrieval]
    RETRIEVAL_POPULARITY: _ClassVar[Retrieval]
SCORER_UNSPECIFIED: Scorer
SCORER_TRITON_INT8: Scorer
SCORER_TRITON_FP32: Scorer
SCORER_IN_PROCESS: Scorer
SCORER_FALLBACK_IN_PROCESS: Scorer
RETRIEVAL_UNSPECIFIED: Retrieval
RETRIEVAL_PERSONAL: Retrieval
RETRIEVAL_POPULARITY: Retrieval

class Value(_message.Message):
    __slots__ = ("text", "number")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    text: str
    number: float
    def __init__(self, text: _Optional[str] = ..., number: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "context", "exclude_item_ids")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    k: int
    context: _containers.MessageMap[str, Value]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_id: _Optional[int] = ..., k: _Optional[int] = ..., context: _Optional[_Mapping[str, Value]] = ..., exclude_item_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "watermark", "dense_version", "scorer", "retrieval")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    DENSE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    watermark: int
    dense_version: str
    scorer: Scorer
    retrieval: Retrieval
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., watermark: _Optional[int] = ..., dense_version: _Optional[str] = ..., scorer: _Optional[_Union[Scorer, str]] = ..., retrieval: _Optional[_Union[Retrieval, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    context: _containers.MessageMap[str, Value]
    def __init__(self, user_id: _Optional[int] = ..., item_ids: _Optional[_Iterable[int]] = ..., context: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "watermark", "dense_version", "scorer")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    DENSE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    watermark: int
    dense_version: str
    scorer: Scorer
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., watermark: _Optional[int] = ..., dense_version: _Optional[str] = ..., scorer: _Optional[_Union[Scorer, str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "label", "ts", "event_id", "weight", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    item_id: int
    label: int
    ts: float
    event_id: int
    weight: float
    context: _containers.MessageMap[str, Value]
    def __init__(self, user_id: _Optional[int] = ..., item_id: _Optional[int] = ..., label: _Optional[int] = ..., ts: _Optional[float] = ..., event_id: _Optional[int] = ..., weight: _Optional[float] = ..., context: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("offsets",)
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offsets: _Optional[_Iterable[int]] = ...) -> None: ...
