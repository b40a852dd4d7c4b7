import django_filters

from controlplane.core import filtersets as strict
from controlplane.fleet.choices import RevisionStatus
from controlplane.fleet.models import Deployment, Replica, Revision


class DeploymentFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = Deployment
        fields = ["tenant", "name", "model_name", "placement_strategy"]


class ReplicaFilterSet(strict.FilterSet):
    deployment = django_filters.UUIDFilter()
    node = django_filters.UUIDFilter()
    placed = strict.BooleanFilter(field_name="node", lookup_expr="isnull", exclude=True)

    class Meta:
        model = Replica
        fields = ["deployment", "node", "placed"]


class RevisionFilterSet(strict.FilterSet):
    node = django_filters.UUIDFilter()
    status = django_filters.ChoiceFilter(choices=RevisionStatus.choices)

    class Meta:
        model = Revision
        fields = ["node", "status", "generation"]
