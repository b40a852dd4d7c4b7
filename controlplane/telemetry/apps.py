from django.apps import AppConfig


class TelemetryConfig(AppConfig):
    name = "controlplane.telemetry"
    label = "telemetry"

    def ready(self) -> None:
        from controlplane.telemetry.metrics import register_collectors

        register_collectors()
