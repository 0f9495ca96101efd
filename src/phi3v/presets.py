"""The prompts behind `describe`, `ocr` and `compare`, in one place, and OCR JSON validation."""

from __future__ import annotations

import json
import re
from typing import Any

DESCRIBE = (
    "Describe this image in detail. If it is a chart, diagram or screenshot, say what it shows, "
    "read its labels and values, and summarise the main trend or message."
)

OCR = {
    "text": (
        "Transcribe all the text in this image exactly as written, in reading order (top to bottom, left "
        "to right), keeping line breaks. Output only the transcription, with no commentary."
    ),
    "markdown": (
        "Transcribe all the text in this image exactly as written, in reading order, as Markdown: keep "
        "headings, lists and paragraphs, and write tables as Markdown tables. Output only the "
        "transcription, with no commentary."
    ),
    "json": (
        "Transcribe all the text in this image exactly as written, in reading order. Answer with one JSON "
        'object and nothing else, of the form {"text": "<the full transcription>", "lines": ["<line 1>", '
        '"<line 2>", ...]}.'
    ),
}

OCR_JSON_RETRY = "That was not a valid JSON object. Answer again with only the JSON object, no other text."

COMPARE = (
    "Compare these images. Describe what they have in common and list every difference between them: "
    "objects added, removed or moved, and changes of colour, size, text or layout."
)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in a model answer (tolerating a ```json fence around it), or None."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidate = (fenced.group(1) if fenced else text).strip()
    try:
        value = json.loads(candidate)
    except json.JSONDecodeError:
        start, end = candidate.find("{"), candidate.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            value = json.loads(candidate[start : end + 1])
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None
