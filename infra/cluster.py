"""A Dask cluster of one worker process per device: each worker owns one device (``HVP_DEVICE``, an explicit index
such as ``cuda:1``), runs one task at a time and declares a ``GPU`` resource when its device is a GPU.

Workers are started by nannies in fresh (spawned) processes whose environment is set before Python starts, so CUDA
is never initialised in a parent that forks, and ``OMP_NUM_THREADS`` caps each worker's threads. On several
machines the same layout is started by hand (see docs/scale-out.md): one ``dask worker`` per device, pointed at a
scheduler; the flows take its address and need no code change.
"""

from __future__ import annotations

from typing import Any

#: Environment variable naming the device a worker process owns (read by pipelines.workers.worker_device).
DEVICE_ENV = "HVP_DEVICE"


def device_worker_spec(device: str, threads: int = 1) -> dict[str, Any]:
    """The nanny spec of one worker that owns ``device`` ("cpu", "cuda:0", ...): one task thread, ``threads``
    compute threads (OMP/MKL/torch), a ``GPU`` resource on a GPU."""
    from distributed import Nanny

    caps = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    options: dict[str, Any] = {"nthreads": 1, "env": {DEVICE_ENV: device, **caps}, "dashboard_address": None}
    if device.startswith("cuda"):
        options["resources"] = {"GPU": 1}
    return {"cls": Nanny, "options": options}


def device_cluster(devices: list[str], threads: int = 1) -> Any:
    """A local cluster of one worker process per entry of ``devices`` (e.g. ["cuda:0", "cuda:1"], or ["cpu",
    "cpu"] to measure distribution on CPU cores); use it as a context manager and pass ``cluster.scheduler_address``
    to the flows."""
    from distributed import Scheduler, SpecCluster

    if not devices:
        raise ValueError("device_cluster needs at least one device, e.g. ['cuda:0'] or ['cpu'].")
    workers = {f"w{i}-{d.replace(':', '')}": device_worker_spec(d, threads) for i, d in enumerate(devices)}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def local_devices() -> list[str]:
    """One entry per visible GPU (``cuda:<i>``), ``["cpu"]`` without one (counting devices leaves torch's CUDA state
    uninitialised, and the workers are spawned, never forked)."""
    import torch

    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
