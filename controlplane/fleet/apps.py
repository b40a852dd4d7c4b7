from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "controlplane.fleet"
    label = "fleet"

    def ready(self) -> None:
        from controlplane.fleet import receivers
        from controlplane.fleet.models import Replica
        from controlplane.inventory import signals as inventory
        from controlplane.storage import selectors as storage_selectors
        from controlplane.storage import signals as storage
        from controlplane.tenancy import signals as tenancy

        tenancy.inference_keys_changed.connect(receivers.inference_keys_changed)
        tenancy.policy_changed.connect(receivers.policy_changed)
        tenancy.quota_changed.connect(receivers.quota_changed)
        inventory.nodes_changed.connect(receivers.nodes_changed)
        inventory.node_capacity_changed.connect(receivers.node_capacity_changed)
        storage.storage_changed.connect(receivers.storage_changed)
        # Replicas' model volumes take room in storage pools.
        storage_selectors.occupants.append(
            storage_selectors.Occupant(
                Replica, size="deployment__model_volume_bytes", tenant="deployment__tenant_id"
            )
        )
