import django_filters

from controlplane.tenancy.choices import PriorityClass, Role
from controlplane.tenancy.models import InferenceKey, Membership, Tenant, TenantPolicy


class TenantFilterSet(django_filters.FilterSet):
    class Meta:
        model = Tenant
        fields = ["slug", "is_active"]


class MembershipFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()
    role = django_filters.ChoiceFilter(choices=Role.choices)
    user = django_filters.CharFilter(field_name="user__username")

    class Meta:
        model = Membership
        fields = ["tenant", "role", "user"]


class InferenceKeyFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()
    revoked = django_filters.BooleanFilter(
        field_name="revoked_at", lookup_expr="isnull", exclude=True
    )

    class Meta:
        model = InferenceKey
        fields = ["tenant", "revoked"]


class TenantPolicyFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()
    priority_class = django_filters.ChoiceFilter(choices=PriorityClass.choices)

    class Meta:
        model = TenantPolicy
        fields = ["tenant", "priority_class"]
