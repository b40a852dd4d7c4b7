"""Node labels follow Kubernetes' key/value rules, so placement selectors read the same."""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import ValidationError

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
LABEL_VALUE = re.compile(rf"^({_NAME})?$")
MAX_LABELS = 64


def validate_labels(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError("Labels must be an object of string keys to string values.")
    if len(value) > MAX_LABELS:
        raise ValidationError(f"At most {MAX_LABELS} labels.")
    for key, item in value.items():
        if not isinstance(key, str) or not LABEL_KEY.match(key):
            raise ValidationError(
                f"Label key {key!r} is invalid: use an optional DNS prefix and '/', then "
                "1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric."
            )
        if not isinstance(item, str) or not LABEL_VALUE.match(item):
            raise ValidationError(
                f"Label {key!r} has an invalid value {item!r}: use a string of at most 63 "
                "letters, digits, '-', '_' or '.', starting and ending alphanumeric."
            )
