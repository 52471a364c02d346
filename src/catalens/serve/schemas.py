"""Pydantic models of the server's JSON bodies: what ``/docs`` shows, what requests are checked against.

Requests (:class:`TFPredictRequest`, :class:`KServeInferRequest`) are validated before anything
else is looked at; they fix the types only (a KServe ``shape`` is a list of whole numbers >= 0,
``parameters`` an object, ``outputs`` a list of objects, ...), and the ``parse_*`` functions of
:mod:`catalens.serve.protocols` check what the values mean, with messages that say how to fix the
request. JSON nesting is bounded by the parser (200 levels).

Responses: the envelopes are typed for ``/docs``; the parts shaped by the model's decoder (per
image classes, tags, hierarchy, labels; the TF-Serving rows; the KServe output data) are
documented but not constrained (``extra`` fields are kept), so the server's answers are exactly
what the routes build.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

_B64_EXAMPLE = "/9j/4AAQSkZJRg..."


class TFPredictRequest(BaseModel):
    """TF-Serving REST predict: ``instances`` (row format) or ``inputs`` (columnar format)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={
        "examples": [{"instances": [{"b64": _B64_EXAMPLE}]}, {"inputs": {"image": [{"b64": _B64_EXAMPLE}]}}]})
    signature_name: StrictStr | None = None
    instances: list[Any] | dict[str, Any] | None = Field(
        None, description='photos as [{"b64": "<base64 bytes>"}, ...] or [{"<input>": {"b64": ...}}, ...]; '
                          'a "title" next to "b64" is the product title (models trained with --text)')
    inputs: list[Any] | dict[str, Any] | None = Field(
        None, description='columnar: {"<input>": [{"b64": ...}, ...]} or [{"b64": ...}, ...]; '
                          'optionally "title": ["...", ...], one per photo')


class KServeInput(BaseModel):
    """One input tensor of a v2 infer request (the photos, or the optional ``title`` input)."""

    name: StrictStr = "image"
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(description="sizes, e.g. [n] for n photos")
    datatype: StrictStr = Field(description="BYTES")
    parameters: dict[str, Any] | None = Field(None, description='e.g. {"binary_data_size": N}')
    data: list[Any] | None = Field(None, description="base64 strings (photos) or UTF-8 strings (titles)")


class KServeRequestedOutput(BaseModel):
    """An output the client wants (by task name); all tasks when ``outputs`` is left out."""

    name: StrictStr
    parameters: dict[str, Any] | None = None


class KServeInferRequest(BaseModel):
    """Open Inference Protocol (KServe v2) infer request."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_B64_EXAMPLE]}]}]})
    id: StrictStr | StrictInt | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[KServeInput] = Field(min_length=1)
    outputs: list[KServeRequestedOutput] | None = None


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="short error code, e.g. too_large, bad_parameter, not_an_image")
    message: str = Field(description="what was wrong and how to fix it")


class ErrorResponse(BaseModel):
    """Every refusal: a 4xx (or 503) status with this body."""

    error: ErrorDetail


class ImageResult(BaseModel):
    """One photo's answer in ``/v1/predict``."""

    model_config = ConfigDict(extra="allow")
    index: int
    file: str
    classes: Any = Field(None, description="per class task: the top-k labels with probabilities")
    tags: Any = Field(None, description="per tag task: every tag with its probability, threshold, decision")
    hierarchy: Any = Field(None, description="per hierarchy chain: the predicted path")
    unknown: bool | None = Field(None, description="probably none of the trained categories (unknown_score "
                                                   "over the model's threshold); null for a model without one")
    conflict: bool | None = Field(None, description="the title and the photo disagree strongly on some class task "
                                                    "(models trained with --text; false without a title)")
    conflict_winner: str | None = Field(None, description="'image' or 'title': the side the answer followed "
                                                          "(null without a conflict)")
    explain: dict[str, Any] | None = Field(None, description="with explain=true: {task, label, png_base64}, a "
                                                             "Grad-CAM overlay PNG at the photo's size")
    timings: dict[str, float] = Field(description="decode_ms, queue_ms, inference_ms, batch_size, total_ms")


class PredictResponse(BaseModel):
    """``/v1/predict`` answer."""

    model_config = ConfigDict(extra="allow")
    model: str
    images: list[ImageResult]
    timings: dict[str, float]
    titles: str | None = Field(None, description="what was done with the titles (only when some were sent)")


class TFPredictResponse(BaseModel):
    """TF-Serving answer: ``predictions`` (row format) or ``outputs`` (columnar format)."""

    predictions: list[dict[str, Any]] | None = Field(None, description="per photo: per task its probabilities")
    outputs: dict[str, list[Any]] | None = Field(None, description="per task: the photos' probabilities")


class KServeOutputTensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    datatype: str = Field(description="FP32 (probabilities) or BYTES (labels)")
    shape: list[int]
    data: list[Any]


class KServeInferResponse(BaseModel):
    """Open Inference Protocol infer answer: one FP32 output per task."""

    model_config = ConfigDict(extra="allow")
    model_name: str
    model_version: str
    id: str | int | None = None
    outputs: list[KServeOutputTensor]
    parameters: dict[str, Any] | None = None


class KServeModelMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    versions: list[str]
    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parameters: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TFModelStatus(BaseModel):
    model_version_status: list[dict[str, Any]]


class TFModelMetadata(BaseModel):
    model_spec: dict[str, Any]
    metadata: dict[str, Any]
