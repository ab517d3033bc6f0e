"""The contract of an /v1/images/generations body, and its check against a trained model's card. Torch-free.

OpenAI's image-generation fields, read for a small class-conditional model:

    field            accepted                               meaning here
    model            a trained image model (ft:gan:..., ft:vae:...)
    prompt           a class name of the model, "" for an unconditional one
    n                integer 1..100                          images drawn, z_1..z_n from one seeded draw
    size             "SxS", the model's own size (or absent)   a GAN/VAE draws one size only
    seed             integer 0..2^63-1 (absent: fixed per batch and custom_id)
    response_format  "url" (a PNG file served by genq) | "b64_json"
    output_format    "png"
    user             accepted, not used
genq's extensions, VAE only:
    mode             "sample" (default) | "reconstruct" | "interpolate"
    image            reconstruct: a PNG or JPEG, base64 (at most 4 MiB), encoded and decoded through
                     the VAE under the prompt's class
    to_prompt        interpolate: n images (n >= 2) whose class embedding goes from prompt's to
                     to_prompt's in equal steps, one z for all of them
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.batches.request_contract import INT64_MAX, RequestError, first_error

IMAGES_ENDPOINT = "/v1/images/generations"
MAX_IMAGES_PER_LINE = 100
MAX_IMAGE_BYTES = 4 << 20  # a reconstruct line's decoded image


@dataclass(frozen=True)
class ImageRequest:
    model: str
    prompt: str
    n: int
    size: int | None  # the side asked for, None for the model's own
    seed: int | None
    response_format: str  # "url" | "b64_json"
    mode: str  # "sample" | "reconstruct" | "interpolate"
    image: bytes | None = None  # reconstruct: the encoded picture
    to_prompt: str | None = None  # interpolate


class _ImageBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: Annotated[str, Field(min_length=1)]
    prompt: str = ""
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES_PER_LINE)] = 1
    size: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")] | None = None
    seed: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png"] | None = None
    user: str | None = None
    mode: Literal["sample", "reconstruct", "interpolate"] = "sample"
    image: Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_BYTES * 4 // 3 + 4)] | None = None
    to_prompt: str | None = None


def parse_image_body(body: Any, *, strict: bool = True) -> ImageRequest:
    """The typed request, or RequestError naming the first bad parameter (strict=False drops unknown ones)."""
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object", "invalid_type", "body")
    if not strict:
        body = {name: value for name, value in body.items() if name in _ImageBody.model_fields}
    try:
        parsed = _ImageBody.model_validate(body)
    except ValidationError as exc:
        raise first_error(exc) from None
    size = None
    if parsed.size is not None:
        width, height = (int(side) for side in parsed.size.split("x"))
        if width != height:
            raise RequestError(f"size {parsed.size!r}: genq's image models draw square images", "invalid_value",
                               "size")
        size = width
    image = None
    if parsed.mode == "reconstruct":
        if parsed.image is None:
            raise RequestError("mode 'reconstruct' needs image: a PNG or JPEG as base64", "missing_required_parameter",
                               "image")
        try:
            image = base64.b64decode(parsed.image.split(",", 1)[-1] if parsed.image.startswith("data:")
                                     else parsed.image, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image must be base64 (optionally a data: URL)", "invalid_value", "image") from None
        if parsed.n != 1:
            raise RequestError("mode 'reconstruct' returns one image: n must be 1", "invalid_value", "n")
    elif parsed.image is not None:
        raise RequestError("image is read only with mode 'reconstruct'", "invalid_value", "image")
    if parsed.mode == "interpolate":
        if parsed.to_prompt is None:
            raise RequestError("mode 'interpolate' needs to_prompt: the class to end at", "missing_required_parameter",
                               "to_prompt")
        if parsed.n < 2:
            raise RequestError("mode 'interpolate' draws n >= 2 images from prompt to to_prompt", "invalid_value", "n")
    elif parsed.to_prompt is not None:
        raise RequestError("to_prompt is read only with mode 'interpolate'", "invalid_value", "to_prompt")
    return ImageRequest(model=parsed.model, prompt=parsed.prompt, n=parsed.n, size=size, seed=parsed.seed,
                        response_format=parsed.response_format, mode=parsed.mode, image=image,
                        to_prompt=parsed.to_prompt)


def check_against_card(request: ImageRequest, card: dict[str, Any]) -> None:
    """RequestError when the model (its card: workers/images/artifact.py) cannot draw what the line asks."""
    side, classes = int(card["image_size"]), list(card["class_names"])
    if request.size is not None and request.size != side:
        raise RequestError(f"size '{request.size}x{request.size}' cannot be produced by {request.model}, which draws "
                           f"{side}x{side} images only", "invalid_value", "size")
    _check_class(request.prompt, classes, request.model, "prompt")
    if request.mode != "sample" and card["architecture"] != "vae":
        raise RequestError(f"mode {request.mode!r} needs a VAE; {request.model} is a {card['architecture'].upper()}",
                           "invalid_value", "mode")
    if request.mode == "interpolate":
        if not classes:
            raise RequestError(f"mode 'interpolate' goes between classes; {request.model} has none", "invalid_value",
                               "mode")
        _check_class(request.to_prompt or "", classes, request.model, "to_prompt")


def _check_class(prompt: str, classes: list[str], model: str, param: str) -> None:
    if classes and prompt not in classes:
        shown = ", ".join(repr(c) for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise RequestError(f"{param} {prompt!r} is not a class of {model}; its classes: {shown}", "invalid_value",
                           param)
    if not classes and prompt:
        raise RequestError(f"{model} is unconditional (trained without classes): {param} must be empty",
                           "invalid_value", param)
