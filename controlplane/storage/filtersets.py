import django_filters

from controlplane.storage.choices import PoolKind
from controlplane.storage.models import Artifact, Export, Pool, QosPolicy, Volume


class PoolFilterSet(django_filters.FilterSet):
    node = django_filters.UUIDFilter()
    kind = django_filters.ChoiceFilter(choices=PoolKind.choices)

    class Meta:
        model = Pool
        fields = ["node", "kind", "name"]


class VolumeFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()
    pool = django_filters.UUIDFilter()
    node = django_filters.UUIDFilter(field_name="pool__node")

    class Meta:
        model = Volume
        fields = ["tenant", "pool", "node", "name"]


class QosPolicyFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = QosPolicy
        fields = ["tenant", "name"]


class ExportFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = Export
        fields = ["tenant"]


class ArtifactFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = Artifact
        fields = ["tenant", "name", "sha256"]
