"""The launch check (``python -m sage_nb.doctor --gpu --launch``): the real launch path with a stand-in CUDA
engine. In a throwaway state folder (the user's registry and engines are untouched), a control plane made
by the caller starts sage_nb's stub engine with ``STUB_GPU_MEMORY=1`` through the same Supervisor, placement
and GPU ledger as a real engine; the stand-in takes the memory its booking says on the device it was given
(by UUID in ``CUDA_VISIBLE_DEVICES``) before it answers the readiness probes. Then NVML must show: the
memory on the booked device under the engine's pids, attributed to it; a second stand-in, placed while a
foreign process fills the device placement would pick, on another device (or refused with the numbers);
the memory gone within seconds of each stop, the bookings released; nothing left running. Each step is a
PASS, FAIL or SKIP with its figures; everything is stopped and removed on any failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from ..engines import process
from ..errors import Conflict, ControlPlaneError
from ..gpus.sizing import CUDA_CONTEXT_MIB
from ..settings import Settings
from . import probe

STUB_PATH = str(Path(__file__).resolve().parents[2] / "testing" / "stub_engine")
NAME = "doctor-standin"


def launch_settings(base: Settings, state_dir: Path, ready_s: float) -> Settings:
    """The stand-ins' control plane: the user's engine Python, environment and GPU settings, a throwaway
    registry, real NVML, no shared ledger, no cluster, fast probes."""
    env = dict(base.engine_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (STUB_PATH, env.get("PYTHONPATH")) if p)
    env["STUB_GPU_MEMORY"] = "1"
    return Settings(state_dir=state_dir, engine_python=base.engine_python, engine_env=env, gpus=base.gpus,
                    fake_gpus=None, use_nvml=True, shared_ledger=None, ray_address=None, box_service=None,
                    port_range=base.port_range, startup_timeout=ready_s, health_interval=0.25, stop_grace=5.0,
                    work_probe_interval=0.0, metrics_interval=0.0, adopt_unrecorded=False, make_room=False,
                    keep_alive=None, sleep_mode=base.sleep_mode)


def make_model(folder: Path) -> Path:
    """A model folder sage_nb can size (config.json and a 1 MiB weight file); the stand-in never reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "hidden_size": 128, "max_position_embeddings": 2048, "torch_dtype": "float16"}))
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(1 << 20)
    return folder


def floor(expected_mib: int) -> int:
    """The least a stand-in's processes must show of the ``expected_mib`` it takes: its CUDA context is an
    estimate (the stand-in counts 512 MiB, real ones take some 300 to 900), hence some slack."""
    return expected_mib - max(256, expected_mib // 10)


class LaunchCheck:
    """One run of the check over a control plane (``plane``: the facade's API), step by step."""

    def __init__(self, plane, say: Callable[[dict], None], mib: int, ready_s: float, appear_s: float,
                 free_s: float) -> None:
        self.plane, self.say = plane, say
        self.mib, self.ready_s, self.appear_s, self.free_s = mib, ready_s, appear_s, free_s
        self.steps: list[dict] = []
        self.started: list[dict] = []  # engines started, with their pids and figures
        self.holder: subprocess.Popen | None = None
        self.seen: dict[int, float | None] = {}  # every pid of a stand-in or the foreign process: its start time
        self.utilization = 0.0  # the stand-ins' --gpu-memory-utilization

    def step(self, name: str, status: str, detail: str) -> bool:
        """Record and say one step; True when it passed."""
        self.steps.append({"step": name, "status": status, "detail": detail})
        self.say(self.steps[-1])
        return status == "PASS"

    # ------------------------------------------------------------------ readings
    def devices(self) -> dict:
        """Every device of the machine by UUID, read from NVML now."""
        return {d.uuid: d for d in self.plane.inventory.all_devices()}

    def held(self, pids: set[int]) -> dict[str, int]:
        """MiB NVML shows under ``pids``, by device UUID (devices with none left out)."""
        out = {}
        for uuid, d in self.devices().items():
            mib = sum(d.process_mib.get(p, 0) for p in pids)
            if mib:
                out[uuid] = mib
        return out

    def label(self, uuid: str) -> str:
        """``device 0 (GPU-...)``."""
        d = self.devices().get(uuid)
        return f"device {d.index} ({uuid})" if d else uuid

    # ------------------------------------------------------------------ steps
    def run(self, model: Path) -> None:
        """Every step in order; a step that fails skips those that build on it (the stops and the final
        check always run)."""
        usable = self.plane.inventory.devices()
        if self.plane.inventory.source != "nvml" or not usable:
            why = self.plane.inventory.error or "none found"
            self.step("GPU", "SKIP", f"no NVIDIA GPU this server may use ({why}): nothing to launch on")
            return
        self.utilization = round(max(self.mib / max(d.total_mib for d in usable), 0.01), 4)
        first = self.launch(model, f"{NAME}-1")
        if first is None:
            return
        if self.appeared(first) and self.attributed(first):
            second = self.around_foreign(model)
            if second is not None:
                self.appeared(second)
        for engine in list(self.started):
            self.stopped(engine)
        self.nothing_left()

    def see(self, pids) -> None:
        """Remember processes to check at the end (with their start times: a reused pid is not ours)."""
        for pid in pids:
            if pid not in self.seen:
                self.seen[pid] = process.start_time(pid)

    def launch(self, model: Path, name: str) -> dict | None:
        """Start a stand-in through the control plane and wait until it is ready."""
        t0 = time.monotonic()
        try:
            e = self.plane.start_engine(str(model), name=name, gpu_memory_utilization=self.utilization, wait=True,
                                        timeout=self.ready_s)
        except ControlPlaneError as err:
            self.step("launch", "FAIL", f"{name} did not start: {err.message}")
            return None
        return self.record(e, time.monotonic() - t0)

    def record(self, e: dict, took: float) -> dict | None:
        """Check a started stand-in's booking and ``CUDA_VISIBLE_DEVICES``; keep it for the later steps."""
        with self.plane.registry.snapshot() as txn:
            booked = [(uuid, mib) for eid, _i, uuid, mib in txn.bookings() if eid == e["id"]]
        created = process.start_time(e["pid"])
        pids = process.tree_pids(e["pid"], created)
        self.see(pids)
        try:
            given = psutil.Process(e["pid"]).environ().get("CUDA_VISIBLE_DEVICES")
        except psutil.Error:
            given = None
        uuid = booked[0][0] if booked else None
        total = self.devices()[uuid].total_mib if uuid in self.devices() else 0
        entry = {**e, "uuid": uuid, "pids": pids, "create_time": created,
                 "expected_mib": int(self.utilization * total)}  # what vLLM would take: its budget
        self.started.append(entry)
        figures = (f"{e['name']} ready in {took:.1f} s: pid {e['pid']}, booked {e['booked_mib']} MiB on "
                   f"{self.label(uuid) if uuid else 'nothing'} (gpu_memory_utilization {self.utilization}), "
                   f"CUDA_VISIBLE_DEVICES={given!r}")
        if not booked or given != uuid:
            self.step("launch", "FAIL", f"{figures}: expected one booking and CUDA_VISIBLE_DEVICES naming its UUID")
            return None
        self.step("launch", "PASS", figures)
        return entry

    def appeared(self, e: dict) -> bool:
        """The stand-in's memory on its booked device under its pids (a child's too), nowhere else."""
        expected, low, high = e["expected_mib"], floor(e["expected_mib"]), e["booked_mib"] + CUDA_CONTEXT_MIB
        deadline = time.monotonic() + self.appear_s
        while True:
            e["pids"] |= process.tree_pids(e["pid"], e["create_time"])
            self.see(e["pids"])
            held = self.held(e["pids"])
            on, elsewhere = held.get(e["uuid"], 0), {u: m for u, m in held.items() if u != e["uuid"]}
            if elsewhere or on >= low or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        where = (f"{self.label(e['uuid'])}, booked {e['booked_mib']} MiB, expected about {expected} MiB "
                 f"({low} to {high})")
        if elsewhere:
            wrong = ", ".join(f"{m} MiB on {self.label(u)}" for u, m in elsewhere.items())
            return self.step("memory", "FAIL", f"{e['name']}: wrong GPU: NVML shows {wrong}; its booking is {where}")
        if not low <= on <= high:
            used = self.devices()[e["uuid"]].used_mib
            return self.step("memory", "FAIL", f"{e['name']}: NVML shows {on} MiB under pids {sorted(e['pids'])} on "
                             f"{where}, after {self.appear_s:.0f} s; the device uses {used} MiB in all (if it rose "
                             "by the stand-in's memory, NVML lists pids of another pid namespace: a container?)")
        return self.step("memory", "PASS", f"{e['name']}: NVML shows {on} MiB under pids {sorted(e['pids'])} on "
                         f"{where}")

    def attributed(self, e: dict) -> bool:
        """``%llm gpus`` gives the stand-in's memory to its engine, not to a foreign process."""
        gpu = next((g for g in self.plane.gpus() if g["uuid"] == e["uuid"]), None)
        mine = [m for m in (gpu or {}).get("parts", {}).get("mine", []) if m["engine_id"] == e["id"]]
        if mine and mine[0]["used_mib"] >= floor(e["expected_mib"]):
            return self.step("attributed", "PASS", f"%llm gpus attributes {mine[0]['used_mib']} MiB of "
                             f"{self.label(e['uuid'])} to {e['name']} (booked {mine[0]['booked_mib']} MiB)")
        foreign = [p for p in (gpu or {}).get("parts", {}).get("processes", []) if p["pid"] in e["pids"]]
        return self.step("attributed", "FAIL", f"%llm gpus does not attribute the memory to {e['name']}: its entry "
                         f"{mine or 'is missing'}; its pids listed as foreign processes: {foreign or 'none'}")

    def around_foreign(self, model: Path) -> dict | None:
        """A foreign process fills the device placement would pick next; the next stand-in must go elsewhere,
        or be refused with the numbers when no other device has room."""
        try:
            plan = self.plane.plan(str(model), name=f"{NAME}-2", gpu_memory_utilization=self.utilization)
        except ControlPlaneError as err:
            self.step("placement", "SKIP", f"no room for a second stand-in, even before a foreign process: "
                                           f"{err.message}")
            return None
        need = plan["booked_mib"] + CUDA_CONTEXT_MIB
        views = {g["index"]: g for g in self.plane.gpus()}
        target = views[plan["gpu_ids"][0]]
        fill = target["available_mib"] - need // 2
        if not self.hold(target["uuid"], fill):
            return None
        views = {g["index"]: g for g in self.plane.gpus()}
        others = [g for i, g in views.items() if i != target["index"] and g["available_mib"] >= need]
        filled = (f"a foreign process (pid {self.holder.pid}) holds {fill} MiB on device {target['index']}, leaving "
                  f"{views[target['index']]['available_mib']} MiB available; a stand-in needs {need}")
        t0 = time.monotonic()
        try:
            e = self.plane.start_engine(str(model), name=f"{NAME}-2", gpu_memory_utilization=self.utilization,
                                        wait=True, timeout=self.ready_s)
        except Conflict as err:
            self.release_holder()
            status = "FAIL" if others else "PASS"
            room = f"; device(s) {[g['index'] for g in others]} had room" if others else ""
            self.step("placement", status, f"refused while {filled}{room}: {err.message}")
            return None
        except ControlPlaneError as err:
            self.release_holder()
            self.step("placement", "FAIL", f"{NAME}-2 did not start: {err.message}")
            return None
        self.release_holder()
        entry = self.record(e, time.monotonic() - t0)
        if entry is None:
            return None
        status = "FAIL" if e["gpu_ids"] == [target["index"]] else "PASS"
        self.step("placement", status, f"{e['name']} went to device {e['gpu_ids'][0]} while {filled}")
        return entry if status == "PASS" else None

    def hold(self, uuid: str, mib: int) -> bool:
        """Start the foreign process: ``mib`` MiB on ``uuid``, outside sage_nb's ledger."""
        settings = self.plane.settings
        env = {**os.environ, **settings.engine_env, "CUDA_VISIBLE_DEVICES": uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        self.holder = subprocess.Popen(
            [settings.engine_python, "-m", "vllm.entrypoints.openai.stub_gpu", "--mib", str(mib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.see([self.holder.pid])
        line, said = probe.read_marked(self.holder, b"holding ", time.monotonic() + self.ready_s)
        deadline = time.monotonic() + self.appear_s
        while line is not None and self.held({self.holder.pid}).get(uuid, 0) < mib * 0.9:
            if time.monotonic() > deadline:
                line, said = None, f"NVML does not show its {mib} MiB on {uuid}"
            time.sleep(0.2)
        if line is None:
            self.release_holder()
            return self.step("placement", "FAIL", f"the foreign process could not take {mib} MiB on {uuid}: {said}")
        return True

    def release_holder(self) -> None:
        """End the foreign process (its stdin closes; killed if it lingers)."""
        if self.holder is not None:
            probe.end(self.holder)
            self.holder = None

    def stopped(self, e: dict) -> bool:
        """Stop a stand-in: its memory must be gone from NVML within ``free_s``, its booking and port released."""
        before = self.held(e["pids"]).get(e["uuid"], 0)
        t0 = time.monotonic()
        try:
            self.plane.stop_engine(e["id"])
        except ControlPlaneError as err:
            return self.step("stop", "FAIL", f"{e['name']} did not stop: {err.message}")
        took = time.monotonic() - t0
        self.started.remove(e)
        deadline = time.monotonic() + self.free_s
        while (left := self.held(e["pids"])) and time.monotonic() < deadline:
            time.sleep(0.1)
        freed = time.monotonic() - t0 - took
        with self.plane.registry.snapshot() as txn:
            kept = [b for b in txn.bookings() if b[0] == e["id"]] + [
                f"port {p}" for p, eid in txn.leases().items() if eid == e["id"]]
        if left:
            where = ", ".join(f"{m} MiB on {self.label(u)}" for u, m in left.items())
            return self.step("stop", "FAIL", f"{e['name']} stopped in {took:.2f} s but NVML still shows {where} under "
                             f"pids {sorted(e['pids'])} {self.free_s:.0f} s later")
        if kept:
            return self.step("stop", "FAIL", f"{e['name']} stopped but still holds {kept} in the registry")
        return self.step("stop", "PASS", f"{e['name']} stopped in {took:.2f} s; NVML shows its {before} MiB gone "
                         f"{freed:.2f} s later; its booking and port released")

    def nothing_left(self) -> bool:
        """No process of the check runs, NVML shows none of them, the registry holds nothing."""
        alive = [p for p in sorted(self.seen) if process.is_alive(p, self.seen[p])]
        held = self.held(set(self.seen))
        with self.plane.registry.snapshot() as txn:
            kept = txn.bookings() + [f"port {p}" for p in txn.leases()]
        if alive or held or kept:
            return self.step("nothing left", "FAIL", f"left: processes {alive}, GPU memory {held}, registry {kept}")
        return self.step("nothing left", "PASS", f"no process of pids {sorted(self.seen)} runs, NVML shows none of "
                         "them, no booking or port lease is left")

    def close(self) -> None:
        """Stop and remove whatever is left (after a failure too)."""
        self.release_holder()
        for e in self.started:
            try:
                self.plane.stop_engine(e["id"])
            except ControlPlaneError:
                process.kill_tree(e["pid"], e.get("create_time"), 2.0)
        try:
            self.plane.stop_all(prune=True)
        finally:
            self.plane.close()


def run(base: Settings, make_plane: Callable[[Settings], object], say: Callable[[dict], None] = lambda s: None,
        mib: int = 1024, ready_s: float = 120.0, appear_s: float = 15.0, free_s: float = 10.0) -> list[dict]:
    """Run the launch check; ``make_plane(settings)`` builds the control plane (``ControlPlane``), ``say(step)``
    is called as each step ends. Returns the steps (``{"step", "status", "detail"}``)."""
    folder = Path(tempfile.mkdtemp(prefix="sage_nb-doctor-"))
    check, steps = None, []
    try:
        check = LaunchCheck(make_plane(launch_settings(base, folder / "state", ready_s)), say, mib, ready_s,
                            appear_s, free_s)
        steps = check.steps
        check.run(make_model(folder / "model"))
    except Exception as e:  # said as a failed step; everything started is stopped below
        steps.append({"step": "error", "status": "FAIL", "detail": f"{type(e).__name__}: {e}"})
        say(steps[-1])
    finally:
        if check is not None:
            try:
                check.close()
            except Exception as e:
                steps.append({"step": "clean-up", "status": "FAIL", "detail": f"{type(e).__name__}: {e}"})
                say(steps[-1])
        shutil.rmtree(folder, ignore_errors=True)
    return steps
