from django.apps import AppConfig


class SloConfig(AppConfig):
    name = "controlplane.slo"
    label = "slo"
    verbose_name = "SLOs"

    def ready(self) -> None:
        from controlplane.fleet import hooks
        from controlplane.slo import selectors
        from controlplane.slo.metrics import SloCollector
        from controlplane.telemetry.metrics import REGISTRY

        hooks.threshold_sources.append(selectors.thresholds_for_nodes)
        hooks.unshare_checks.append(selectors.unshare_problems)
        REGISTRY.register(SloCollector())
