"""The base FilterSet of every list endpoint: a filter value the API cannot use is a 400.

django-filter reads `?tenant=` as "no filter", `?placed=0` or `?placed=null` as whatever
its widget guesses and `?numa_node=0.5` as a number; each of those returned a list the
client did not ask for. Here an empty value, a boolean other than true/false and a
non-integer for an integer field are refused, naming the parameter. A text value
holding NUL is refused too (PostgreSQL text cannot hold one), and the schema says so.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.db import models
from django_filters.filterset import FILTER_FOR_DBFIELD_DEFAULTS
from drf_spectacular.utils import extend_schema_field
from rest_framework import filters

NO_NUL = "^[^\\x00]*$"


class BooleanField(forms.Field):
    widget = forms.TextInput

    def to_python(self, value: Any) -> bool | None:
        if value in self.empty_values:
            return None
        try:
            return {"true": True, "false": False}[str(value).lower()]
        except KeyError:
            raise forms.ValidationError(f"Must be true or false, not {value!r}.") from None


class BooleanFilter(django_filters.BooleanFilter):
    field_class = BooleanField


class IntegerFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField


@extend_schema_field({"type": "string", "minLength": 1, "pattern": NO_NUL})
class CharFilter(django_filters.CharFilter):
    pass


class SearchFilter(filters.SearchFilter):
    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["pattern"] = NO_NUL
        return parameters


class NonEmptyParameters(forms.Form):
    def clean(self) -> dict[str, Any] | None:
        for name in self.fields:
            if "" in self.data.getlist(name):
                self.add_error(name, "Give a value, or leave the parameter out to not filter.")
        return super().clean()


def _instead(default: type, strict: type) -> dict[type[models.Field], dict[str, Any]]:
    return {
        field: {"filter_class": strict}
        for field, spec in FILTER_FOR_DBFIELD_DEFAULTS.items()
        if spec.get("filter_class") is default
    }


class FilterSet(django_filters.FilterSet):
    FILTER_DEFAULTS = {
        **FILTER_FOR_DBFIELD_DEFAULTS,
        **_instead(django_filters.CharFilter, CharFilter),
        **_instead(django_filters.BooleanFilter, BooleanFilter),
        **{
            field: {"filter_class": IntegerFilter}
            for field in FILTER_FOR_DBFIELD_DEFAULTS
            if issubclass(field, models.IntegerField | models.AutoField)
        },
    }

    def get_form_class(self) -> type[forms.Form]:
        form = super().get_form_class()
        return type(form.__name__, (NonEmptyParameters, form), {})
