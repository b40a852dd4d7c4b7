import django_filters

from controlplane.core import filtersets as strict
from controlplane.storage.choices import PoolKind
from controlplane.storage.models import Artifact, Export, Pool, QosPolicy, Volume


class PoolFilterSet(strict.FilterSet):
    node = django_filters.UUIDFilter()
    kind = django_filters.ChoiceFilter(choices=PoolKind.choices)

    class Meta:
        model = Pool
        fields = ["node", "kind", "name"]


class VolumeFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()
    pool = django_filters.UUIDFilter()
    node = django_filters.UUIDFilter(field_name="pool__node")

    class Meta:
        model = Volume
        fields = ["tenant", "pool", "node", "name"]


class QosPolicyFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = QosPolicy
        fields = ["tenant", "name"]


class ExportFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = Export
        fields = ["tenant"]


class ArtifactFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = Artifact
        fields = ["tenant", "name", "sha256"]
