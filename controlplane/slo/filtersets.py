import django_filters

from controlplane.core import filtersets as strict
from controlplane.slo.choices import Scope, Sli, Window
from controlplane.slo.models import Slo


class SloFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()
    deployment = django_filters.UUIDFilter()
    sli = django_filters.ChoiceFilter(choices=Sli.choices)
    scope = django_filters.ChoiceFilter(choices=Scope.choices)
    window = django_filters.ChoiceFilter(choices=Window.choices)

    class Meta:
        model = Slo
        fields = ["tenant", "deployment", "sli", "scope", "window", "name", "model_name"]
