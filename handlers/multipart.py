"""multipart/form-data bodies, parsed here (python-multipart) instead of by TorchServe's frontend.

TorchServe's Java decoder answers 500 with its internals for many malformed forms (an empty
field name, a base64 part, an unknown charset), before our handler runs. The gateway passes
every body on as application/octet-stream with the client's Content-Type beside it, so each
form is parsed here and every malformed one is this request's own 4xx.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from handlers.preprocess import PreprocessError

MAX_PARTS = 16
IDENTITY_ENCODINGS = (b"", b"binary", b"8bit", b"7bit")


def is_multipart(content_type: str | bytes | None) -> bool:
    if not content_type:
        return False
    value = content_type.decode("latin-1") if isinstance(content_type, bytes | bytearray) else str(content_type)
    return value.strip().lower().startswith("multipart/form-data")


def _bad(message: str, status: int = 400, type_: str = "malformed_multipart") -> PreprocessError:
    return PreprocessError(status, type_, message)


def parse(body: bytes, content_type: str | bytes) -> dict[str, bytes]:
    """The form's fields, name -> raw bytes. Raise PreprocessError (4xx) for anything malformed."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise _bad("multipart/form-data without a valid boundary parameter")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    state = {"ended": False}

    def part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise _bad(f"more than {MAX_PARTS} parts")
        parts.append(({}, bytearray()))

    def header_end() -> None:
        parts[-1][0][bytes(header["field"]).strip().lower()] = bytes(header["value"]).strip()
        header["field"].clear()
        header["value"].clear()

    def end() -> None:
        state["ended"] = True

    callbacks = {
        "on_part_begin": part_begin,
        "on_part_data": lambda data, start, stop: parts[-1][1].extend(data[start:stop]),
        "on_header_field": lambda data, start, stop: header["field"].extend(data[start:stop]),
        "on_header_value": lambda data, start, stop: header["value"].extend(data[start:stop]),
        "on_header_end": header_end,
        "on_end": end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise _bad(f"malformed multipart body: {exc}") from None
    if not state["ended"] or not parts:
        raise _bad("the multipart body has no closing boundary or no part")
    fields: dict[str, bytes] = {}
    for headers, data in parts:
        disposition, params = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition.lower() != b"form-data":
            raise _bad("every part needs Content-Disposition: form-data")
        raw_name = params.get(b"name", b"")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise _bad("a part's name is not ASCII") from None
        if not name:
            raise _bad("a part has an empty name")
        if name in fields:
            raise _bad(f"the field '{name}' appears twice")
        encoding = headers.get(b"content-transfer-encoding", b"").lower()
        if encoding not in IDENTITY_ENCODINGS:
            raise _bad(f"Content-Transfer-Encoding {encoding.decode('latin-1')!r} is not accepted: send the "
                       "part's bytes as they are", 415, "unsupported_transfer_encoding")
        fields[name] = bytes(data)
    return fields
