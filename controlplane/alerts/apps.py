from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "controlplane.alerts"
    label = "alerts"

    def ready(self) -> None:
        from controlplane.alerts import receivers, selectors
        from controlplane.slo import selectors as slo_selectors
        from controlplane.slo import signals as slo

        slo.alert_changed.connect(receivers.slo_alert_changed)
        slo_selectors.alert_sources.append(selectors.slo_alerts_in_period)
