"""DRF base classes: strict serializers, tenant fields and tenant-scoped viewsets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from django.db import models, router
from django.db.models import Model, ProtectedError, QuerySet, RestrictedError
from django.db.models.deletion import Collector
from django.utils.text import capfirst
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from controlplane.core.exceptions import DependentsExist
from controlplane.core.scoping import scope, writable_tenant_ids
from controlplane.core.secrets import Issued


class StrictCharField(serializers.CharField):
    """A string field that refuses numbers and booleans instead of turning them into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean only: DRF would also take 0, 1, "yes" or "off"."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


@extend_schema_field({"type": "number", "format": "double", "exclusiveMinimum": 0})
class PositiveFloatField(serializers.FloatField):
    """A float that must be above 0, which OpenAPI says with `exclusiveMinimum`."""


class StrictSerializer(serializers.ModelSerializer):
    """Rejects unknown and read-only fields by name instead of silently dropping them.

    Automation that sends `hostname` to a node PATCH believes it changed something;
    a 400 naming the field tells it otherwise.
    """

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.BooleanField: StrictBooleanField,
    }

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            errors = {}
            for key in data:
                if key not in self.fields:
                    errors[key] = ["Unknown field."]
                elif key not in writable:
                    errors[key] = ["This field is read-only."]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)


class WritableTenantObjectField(serializers.PrimaryKeyRelatedField):
    """A reference to an object of a tenant the caller administers, reached through
    `tenant_field`; another tenant's object fails like an unknown one: 400, no leak."""

    def __init__(self, *, tenant_field: str = "tenant", **kwargs: Any) -> None:
        self.tenant_field = tenant_field
        super().__init__(**kwargs)

    def get_queryset(self) -> QuerySet[Any]:
        request = self.context.get("request")
        queryset = super().get_queryset()
        tenant_ids = writable_tenant_ids(request.user if request else None)
        if tenant_ids is None:
            return queryset
        return queryset.filter(**{f"{self.tenant_field}__in": tenant_ids})


class TenantScopedMixin:
    """Cuts a viewset's queryset down to the caller's tenants, always.

    Subclasses set `queryset` (with its select/prefetch) and, where the tenant is
    reached through a relation, `tenant_field`.
    """

    tenant_field = "tenant"

    def get_queryset(self) -> QuerySet[Any]:
        return scope(super().get_queryset(), self.request.user, self.tenant_field)  # type: ignore[misc]


def dependents(instance: Model, relations: tuple[str, ...] = ()) -> Counter[type[Model]]:
    """What keeps `instance` from going: the objects the database protects from its delete
    (also through what the delete would cascade to) and those in `relations`."""
    found: Counter[type[Model]] = Counter()
    for name in relations:
        manager = getattr(instance, name)
        if count := manager.count():
            found[manager.model] += count
    try:
        Collector(using=router.db_for_write(type(instance))).collect([instance])
    except ProtectedError as exc:
        found.update(map(type, exc.protected_objects))
    except RestrictedError as exc:
        found.update(map(type, exc.restricted_objects))
    return found


class DependentsConflictMixin:
    """DELETE is a 409 naming what still depends on the object, never a partial cascade.

    `delete_blocked_by` names reverse relations the database would cascade to but that
    an operator must empty first (a node's storage pools); what the database protects
    counts always.
    """

    delete_blocked_by: tuple[str, ...] = ()

    @extend_schema(
        responses={
            204: None,
            409: OpenApiResponse(
                description="Other objects still depend on this one; the message counts them."
            ),
        }
    )
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.get_object()  # type: ignore[attr-defined]
        found = dependents(instance, self.delete_blocked_by)
        if found:
            raise DependentsExist(f"{capfirst(instance._meta.verbose_name)} {instance}", found)
        self.perform_destroy(instance)  # type: ignore[attr-defined]
        return Response(status=status.HTTP_204_NO_CONTENT)


class TenantScopedViewSet(DependentsConflictMixin, TenantScopedMixin, viewsets.ModelViewSet):
    pass


class SecretSerializer(StrictSerializer):
    """A secret-bearing object: its digest never leaves; `revoked` says if it still works."""

    revoked = serializers.SerializerMethodField()

    def get_revoked(self, obj: Any) -> bool:
        return obj.revoked_at is not None


class IssueSecretMixin:
    """Create returns the plaintext secret once; delete revokes instead of erasing history."""

    created_serializer_class: type[Serializer]
    secret_field: str
    # each viewset names its services
    issue: Callable[[dict[str, Any]], Issued]
    revoke: Callable[[Any], None]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)  # type: ignore[attr-defined]
        serializer.is_valid(raise_exception=True)
        issued = self.issue(serializer.validated_data)
        setattr(issued.obj, self.secret_field, issued.secret)
        body = self.created_serializer_class(issued.obj, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: Any) -> None:
        self.revoke(instance)


class SecretViewSet(
    IssueSecretMixin,
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """List, show, issue (plaintext once) and revoke; secrets are never edited."""
