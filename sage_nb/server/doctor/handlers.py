"""A thin handler over the GPU doctor's report (``controlplane/doctor``)."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from sage_nb.controlplane.doctor import report as doctor_report

from ..handlers import SageHandler


class GpuDoctorHandler(SageHandler):
    """``GET sage_nb/api/doctor/gpu``: the GPU doctor's report as this server sees its GPUs (read-only)."""

    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.call(doctor_report.collect, self.cp))


DOCTOR_HANDLERS = [(r"/sage_nb/api/doctor/gpu/?", GpuDoctorHandler)]
