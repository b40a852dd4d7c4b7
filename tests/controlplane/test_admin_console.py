"""The admin console in a real browser: a platform operator finds a node and its GPUs."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model

from controlplane.inventory.models import Nic
from tests.browser import chromium, screenshot_path, sign_in
from tests.controlplane.conftest import World, make_node


def test_operator_browses_nodes_and_cannot_edit_discovered_facts(
    live_server: Any, world: World
) -> None:
    node = make_node("gpu-node-7", world.tenant_a, gpus=8)
    Nic.objects.create(
        node=node,
        device="mlx5_0",
        state="active",
        speed_gbps=400,
        link_layer="InfiniBand",
        numa_node=0,
    )
    get_user_model().objects.filter(pk=world.platform.pk).update()
    world.platform.set_password("operator-pass")
    world.platform.save()

    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, f"{live_server.url}/admin/", "platform", "operator-pass")
        page.goto(f"{live_server.url}/admin/inventory/node/?q=gpu-node")
        assert "none (0/0)" in page.locator("#result_list").inner_text()  # rollout column
        page.click("text=gpu-node-7")
        page.wait_for_selector("#gpus-group")
        page.screenshot(path=screenshot_path("admin-node"), full_page=True)

        gpu_rows = page.locator("#gpus-group tbody tr.has_original")
        assert gpu_rows.count() == 8
        assert "NVIDIA H100 80GB HBM3" in page.locator("#gpus-group").inner_text()
        assert page.locator("#gpus-group input[name$='-uuid']").count() == 0  # read-only
        assert "mlx5_0" in page.locator("#nics-group").inner_text()

        page.fill("#id_maintenance_reason", "PSU swap")
        page.check("#id_maintenance")
        page.click("input[name=_save]")
        page.wait_for_selector(".messagelist .success")
    node.refresh_from_db()
    assert node.maintenance and node.maintenance_reason == "PSU swap"
    assert node.gpus.count() == 8
