"""An engine replica's state folder and published rank (no Ray cluster started)."""

import pytest

pytest.importorskip("ray", reason="the engine replica module needs the ray extra (make test installs it)")

from scalesim.cluster.engine_replica import claim_state_dir  # noqa: E402
from scalesim.memory.disk_store import DiskStore  # noqa: E402


def test_a_replica_whose_serve_rank_a_live_replica_still_holds_takes_the_first_free_state_folder(tmp_path):
    """After a scale-down Serve renumbers ranks, but a replica's published rank never changes: a
    replica started later with a rank whose folder a live replica holds must not take it."""
    assert claim_state_dir(None, 3) == (3, None)
    assert claim_state_dir(tmp_path, 2) == (2, tmp_path / "replica-2")
    held = [DiskStore(tmp_path / f"replica-{r}", 2**20) for r in (0, 2)]  # two live replicas
    try:
        free = claim_state_dir(tmp_path, 2, wait_s=0.5)
        assert free == (1, tmp_path / "replica-1"), "the first folder nobody holds"
        assert claim_state_dir(tmp_path, 3, wait_s=0.5) == (3, tmp_path / "replica-3")
    finally:
        for store in held:
            store.close()
    assert claim_state_dir(tmp_path, 2) == (2, tmp_path / "replica-2"), "released when its process ends"


def test_a_replica_waits_for_its_own_folder_while_another_process_still_holds_it(tmp_path):
    """A stopping replica persists its tiers, or a live one takes the folder in: a replica
    restarted under that rank waits for the folder instead of taking another one."""
    import threading

    held = DiskStore(tmp_path / "replica-1", 2**20)
    threading.Timer(0.5, held.close).start()
    assert claim_state_dir(tmp_path, 1, wait_s=10) == (1, tmp_path / "replica-1")
