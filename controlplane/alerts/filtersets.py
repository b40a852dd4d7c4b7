import django_filters

from controlplane.alerts.choices import AlertState, Event, MessageStatus, Severity
from controlplane.alerts.models import Alert, DeliveryAttempt, OutboxMessage, WebhookEndpoint


class AlertFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()
    state = django_filters.MultipleChoiceFilter(choices=AlertState.choices)
    severity = django_filters.MultipleChoiceFilter(choices=Severity.choices)
    alertname = django_filters.CharFilter(field_name="labels__alertname")

    class Meta:
        model = Alert
        fields = ["tenant", "state", "severity", "fingerprint", "alertname"]


class WebhookEndpointFilterSet(django_filters.FilterSet):
    tenant = django_filters.UUIDFilter()

    class Meta:
        model = WebhookEndpoint
        fields = ["tenant", "enabled", "name"]  # not `format`: DRF reads that as the renderer


class OutboxMessageFilterSet(django_filters.FilterSet):
    endpoint = django_filters.UUIDFilter()
    alert = django_filters.UUIDFilter()
    event = django_filters.ChoiceFilter(choices=Event.choices)
    status = django_filters.MultipleChoiceFilter(choices=MessageStatus.choices)

    class Meta:
        model = OutboxMessage
        fields = ["endpoint", "alert", "event", "status", "webhook_id"]


class DeliveryAttemptFilterSet(django_filters.FilterSet):
    endpoint = django_filters.UUIDFilter(field_name="message__endpoint")
    message = django_filters.UUIDFilter()

    class Meta:
        model = DeliveryAttempt
        fields = ["endpoint", "message", "status_code"]
