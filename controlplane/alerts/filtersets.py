import django_filters

from controlplane.alerts.choices import AlertState, Event, MessageStatus, Severity
from controlplane.alerts.models import Alert, DeliveryAttempt, OutboxMessage, WebhookEndpoint
from controlplane.core import filtersets as strict


class AlertFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()
    state = django_filters.MultipleChoiceFilter(choices=AlertState.choices)
    severity = django_filters.MultipleChoiceFilter(choices=Severity.choices)
    alertname = strict.CharFilter(field_name="labels__alertname")

    class Meta:
        model = Alert
        fields = ["tenant", "state", "severity", "fingerprint", "alertname"]


class WebhookEndpointFilterSet(strict.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = WebhookEndpoint
        fields = ["tenant", "enabled", "name"]  # not `format`: DRF reads that as the renderer


class OutboxMessageFilterSet(strict.FilterSet):
    endpoint = django_filters.UUIDFilter()
    alert = django_filters.UUIDFilter()
    event = django_filters.ChoiceFilter(choices=Event.choices)
    status = django_filters.MultipleChoiceFilter(choices=MessageStatus.choices)

    class Meta:
        model = OutboxMessage
        fields = ["endpoint", "alert", "event", "status", "webhook_id"]


class DeliveryAttemptFilterSet(strict.FilterSet):
    endpoint = django_filters.UUIDFilter(field_name="message__endpoint")
    message = django_filters.UUIDFilter()

    class Meta:
        model = DeliveryAttempt
        fields = ["endpoint", "message", "status_code"]
