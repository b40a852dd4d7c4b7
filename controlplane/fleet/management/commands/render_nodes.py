"""`manage.py render_nodes`: every node's desired state rendered again, now.

Revisions are rendered when something changes what a node runs; a control-plane upgrade
that adds a component (the gateway, say) or a changed setting (`GATEWAY_PORT`) changes
what every node should run without any such change. This issues the new revisions at
once, in batches, and only where the content changed; pinned nodes stay as they are.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from tqdm import tqdm

from controlplane.fleet import services
from controlplane.inventory.models import Node

BATCH = 200


class Command(BaseCommand):
    help = __doc__.splitlines()[0]

    def handle(self, *args: Any, **options: Any) -> None:
        ids = list(Node.objects.filter(pinned=False).order_by("pk").values_list("pk", flat=True))
        issued = 0
        with tqdm(total=len(ids), unit="node", disable=options["verbosity"] < 1) as bar:
            for start in range(0, len(ids), BATCH):
                batch = ids[start : start + BATCH]
                issued += len(services.render_nodes(batch, cause="rendered again by an operator"))
                bar.update(len(batch))
        self.stdout.write(f"{issued} of {len(ids)} nodes got a new revision.")
