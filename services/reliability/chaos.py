"""Faults injected into a running Outrider cluster, and what the soak reads from it.

The faults, in rotation: kill a draft-worker replica, kill a verifier replica (Serve
starts new ones), kill the session-store actor (it restarts empty), freeze a whole
draft or verifier node (SIGSTOP its raylet and every process under it, SIGCONT after
``freeze_s``), and drop every open draft stream (the drafter's gRPC server closes them
as a network fault would and listens again). Freezing needs the node's processes on
this machine, as on a local cluster (`outrider serve`); the rest go through Ray.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import psutil

from ..app.args import DRAFTER_RESOURCE, VERIFIER_RESOURCE
from ..state.client import NAMESPACE

APP = "outrider"
DEPLOYMENTS = ("gateway", "drafter", "verifier")
EVENTS = ("kill drafter", "kill verifier", "kill store", "freeze drafter node", "drop draft streams",
          "freeze verifier node")


def _connect(ray_address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, logging_level="error", log_to_driver=False)


def replicas(ray_address: str, deployment: str) -> list:
    from ray.util.state import list_actors

    # The address is explicit: left out, the state API may find another cluster on this machine.
    return [a for a in list_actors(address=ray_address, filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{APP}:{deployment}"]


def deployment_memory(ray_address: str) -> dict[str, float]:
    """Mean resident memory per replica of each deployment, MiB (replicas on this machine)."""
    out = {}
    for deployment in DEPLOYMENTS:
        sizes = []
        for actor in replicas(ray_address, deployment):
            with contextlib.suppress(psutil.Error, TypeError):
                sizes.append(psutil.Process(actor.pid).memory_info().rss / 2**20)
        out[deployment] = round(sum(sizes) / len(sizes), 1) if sizes else 0.0
    return out


def leftover_state(ray_address: str, settle_s: float = 30.0) -> dict:
    """What is still held once the last streams have had up to ``settle_s`` to be
    released: per deployment, the most sessions any replica reported, and the
    store's sessions and their bytes. Serve's handle picks the replica, so each poll
    asks every deployment 4x its replica count (a replica missed by all of them: 2 x
    2^-8 for two replicas), and only three all-clear polls in a row count as clear."""
    import ray
    from ray import serve

    _connect(ray_address)
    handles = {d: serve.get_deployment_handle(d, app_name=APP) for d in DEPLOYMENTS}
    store = ray.get_actor(f"outrider-state:{APP}", namespace=NAMESPACE)
    deadline, clear = time.monotonic() + settle_s, 0
    while True:
        held = {d: max(h.active_sessions.remote().result() for _ in range(4 * max(1, len(replicas(ray_address, d)))))
                for d, h in handles.items()}
        usage = ray.get(store.usage.remote())
        left = {**held, "store_sessions": usage["sessions"], "store_session_bytes": usage["session_bytes"]}
        clear = 0 if any(left.values()) else clear + 1
        if clear == 3 or time.monotonic() > deadline:
            return left
        time.sleep(1.0 if clear == 0 else 0.2)


def node_processes(resource: str) -> list[psutil.Process]:
    """The raylet of the live node that offers ``resource``, and every process under it."""
    import ray

    # The raylet's socket path names its node uniquely on a machine (its port may be
    # given as 0 on the command line and chosen later).
    sockets = {n["RayletSocketName"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]}
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if "raylet" in (proc.info["name"] or "") and any(f"--raylet_socket_name={s}" in cmdline for s in sockets):
                found += [proc, *proc.children(recursive=True)]
    return found


class Chaos:
    def __init__(self, ray_address: str, freeze_s: float = 10.0):
        _connect(ray_address)
        self.ray_address, self.freeze_s, self.count = ray_address, freeze_s, 0
        self.frozen: list[threading.Thread] = []

    def next_event(self) -> dict:
        """Runs the next fault of the rotation; {"event", "target", "error"}."""
        event = EVENTS[self.count % len(EVENTS)]
        self.count += 1
        try:
            target = self._run(event)
            return {"event": event, "target": target, "error": ""}
        except Exception as error:  # a fault that could not be injected is reported, not fatal
            return {"event": event, "target": "", "error": f"{type(error).__name__}: {error}"}

    def _run(self, event: str) -> str:
        import ray
        from ray import serve

        if event.startswith("kill") and event != "kill store":
            deployment = event.split()[1]
            victim = replicas(self.ray_address, deployment)[0]
            ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)  # Serve starts a new one
            return victim.name
        if event == "kill store":
            ray.kill(ray.get_actor(f"outrider-state:{APP}", namespace=NAMESPACE), no_restart=False)  # restarts empty
            return "outrider-state"
        if event.startswith("freeze"):
            resource = DRAFTER_RESOURCE if "drafter" in event else VERIFIER_RESOURCE
            procs = node_processes(resource)
            if not procs:
                raise RuntimeError(f"no process of the {resource} node on this machine")
            thread = threading.Thread(target=self._freeze, args=(procs,), daemon=True)
            thread.start()
            self.frozen.append(thread)
            return f"{len(procs)} processes for {self.freeze_s:.0f} s"
        dropped = serve.get_deployment_handle("drafter", app_name=APP).drop_streams.remote().result(timeout_s=30)
        return f"{dropped} streams"

    def _freeze(self, procs: list[psutil.Process]) -> None:
        stopped = []
        try:
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGSTOP)
                    stopped.append(proc)
            time.sleep(self.freeze_s)
        finally:
            for proc in stopped:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Waits for every frozen node to be thawed."""
        for thread in self.frozen:
            thread.join()
