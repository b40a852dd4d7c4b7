import django_filters
from django.db.models.fields.json import KeyTextTransform
from rest_framework.exceptions import ValidationError

from controlplane.core import filtersets as strict
from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import Drive, Gpu, Nic, Node
from controlplane.inventory.validators import LABEL_KEY


class NodeFilterSet(strict.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=NodeStatus.choices)
    label = strict.CharFilter(
        method="filter_label", label="Label selector key=value (repeat with commas)"
    )
    gpu_name = strict.CharFilter(field_name="gpus__name", lookup_expr="icontains", distinct=True)
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = Node
        fields = ["status", "maintenance", "tenant", "hostname"]

    def filter_label(self, queryset, name, value):  # noqa: ANN001, ANN201
        for term in filter(None, (part.strip() for part in value.split(","))):
            key, _, wanted = term.partition("=")
            if not LABEL_KEY.match(key):
                raise ValidationError({"label": [f"{key!r} is not a valid label key."]})
            if wanted:  # KeyTextTransform: a key with "__" stays one key, not a path
                queryset = queryset.alias(_label=KeyTextTransform(key, "labels")).filter(
                    _label=wanted
                )
            else:
                queryset = queryset.filter(labels__has_key=key)
        return queryset


class HardwareFilterSet(strict.FilterSet):
    """A UUID filter, not a choice of nodes: an unknown id lists nothing instead of a 400."""

    node = django_filters.UUIDFilter()


class GpuFilterSet(HardwareFilterSet):
    name = strict.CharFilter(lookup_expr="icontains")

    class Meta:
        model = Gpu
        fields = ["node", "name", "mig_mode", "numa_node"]


class NicFilterSet(HardwareFilterSet):
    class Meta:
        model = Nic
        fields = ["node", "state", "link_layer", "numa_node"]


class DriveFilterSet(HardwareFilterSet):
    class Meta:
        model = Drive
        fields = ["node", "numa_node"]
