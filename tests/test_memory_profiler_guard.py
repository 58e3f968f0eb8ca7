"""pid.memory.track_peak_memory survives a torch whose profiler internals changed."""

import torch


def test_peak_memory_falls_back_when_profiler_internals_change(monkeypatch):
    import pid.memory as memory

    monkeypatch.setattr(memory, "_profiler_memory_events", lambda prof: None)
    memory._profiler_memory_events_supported.cache_clear()
    try:
        with memory.track_peak_memory("cpu") as peak:
            block = torch.ones(4 * 1024 * 1024)  # 16 MiB
            del block
        assert peak.method.startswith(("RSS", "unavailable"))
        assert peak.peak_bytes >= 0
    finally:
        monkeypatch.undo()
        memory._profiler_memory_events_supported.cache_clear()
    with memory.track_peak_memory("cpu") as peak:
        block = torch.ones(1024 * 1024)
        del block
    assert peak.method == "torch.profiler CPU allocator events" and peak.peak_bytes >= 4 * 1024 * 1024
