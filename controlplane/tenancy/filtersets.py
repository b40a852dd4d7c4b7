import django_filters

from controlplane.core import filtersets as strict
from controlplane.core.choices import Role
from controlplane.tenancy.choices import PriorityClass
from controlplane.tenancy.models import InferenceKey, Membership, Tenant, TenantPolicy


class TenantFilterSet(strict.FilterSet):
    class Meta:
        model = Tenant
        fields = ["slug", "is_active"]


class MembershipFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()
    role = django_filters.ChoiceFilter(choices=Role.choices)
    user = strict.CharFilter(field_name="user__username")

    class Meta:
        model = Membership
        fields = ["tenant", "role", "user"]


class InferenceKeyFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()
    revoked = strict.BooleanFilter(field_name="revoked_at", lookup_expr="isnull", exclude=True)

    class Meta:
        model = InferenceKey
        fields = ["tenant", "revoked"]


class TenantPolicyFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()
    priority_class = django_filters.ChoiceFilter(choices=PriorityClass.choices)

    class Meta:
        model = TenantPolicy
        fields = ["tenant", "priority_class"]
