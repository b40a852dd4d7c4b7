"""Validated writes every app's services build on: a model is saved only once it is clean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from django.db import connection
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


def update_each(objs: Sequence[Model], fields: Sequence[str]) -> None:
    """Write ``fields`` of each of ``objs`` (rows of one model, by primary key) as they
    are, with one statement per row sent in one go, its values prepared as ``save``
    prepares them. Django's ``bulk_update`` builds a CASE per field and row instead, and
    compiling those cost more than the writes: records arriving by the thousand (an
    agent's report each) are written this way."""
    if not objs:
        return
    meta = objs[0]._meta
    columns = [meta.get_field(name) for name in fields]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in columns)
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"
    rows = [
        [field.get_db_prep_save(getattr(obj, field.attname), connection) for field in columns]
        + [meta.pk.get_db_prep_save(obj.pk, connection)]
        for obj in objs
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)
