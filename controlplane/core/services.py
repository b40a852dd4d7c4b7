"""Validated writes every app's services build on: a model is saved only once it is clean."""

from __future__ import annotations

from typing import Any, TypeVar

from django.db.models import Model

M = TypeVar("M", bound=Model)


def create(model: type[M], **fields: Any) -> M:
    obj = model(**fields)
    obj.full_clean()
    obj.save()
    return obj


def update(obj: M, **changes: Any) -> M:
    for name, value in changes.items():
        setattr(obj, name, value)
    obj.full_clean()
    obj.save()
    return obj
