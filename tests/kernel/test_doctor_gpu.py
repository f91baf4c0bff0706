"""``%llm doctor --gpu``: the GPU doctor's tables in a notebook, from this kernel's embedded control plane or
from the server (its view: the report comes from ``GET sage_nb/api/doctor/gpu``)."""

from types import SimpleNamespace

import pytest

from sage_nb.controlplane.doctor import report
from sage_nb.kernel import doctor
from sage_nb.kernel.client import Client

from ..conftest import shutdown
from ..fakegpus import TWO, engine_env, fake_vllm, install
from .conftest import embedded_shell


@pytest.fixture(autouse=True)
def clean_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def test_doctor_gpu_in_an_embedded_kernel(state_dir, monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, TWO)
    vllm = fake_vllm(tmp_path / "vllm", "vllm", "0.32.0", "cuda")
    sh, cl = embedded_shell(state_dir, monkeypatch, engine_env=engine_env(vllm))
    try:
        out = sh.run_line_magic("llm", "doctor --gpu")
    finally:
        shutdown(cl)
    text, html = repr(out), out._repr_html_()
    assert text.startswith("sage_nb GPU doctor on ") and "as this kernel (embedded mode) sees it" in text
    assert "OK      vLLM" in text and "GPU devices (NVML; MiB)" in text
    assert "GPU-a100-1111" in html and html.count("<table>") == 3
    assert "all good (exit status 0)" in text


def test_doctor_gpu_shows_the_servers_report(monkeypatch, tmp_path, stub_cp):
    install(monkeypatch, tmp_path, None)
    model = report.collect(stub_cp(engine_env=engine_env(fake_vllm(tmp_path / "v"))))

    class ServerTransport:  # what RestTransport gives: the server's report
        mode, control_plane, why_embedded = "server", None, ""
        server = SimpleNamespace(url="http://box:8888/")

        def gpu_doctor(self):
            return model

    out = doctor.gpu_report(Client(transport=ServerTransport()))
    assert "as the server at http://box:8888/ sees it" in repr(out)
    assert "GPU devices: no NVIDIA GPU on this machine; engines run on the CPU" in repr(out)


def test_doctor_help_names_gpu():
    from sage_nb.kernel.parsing import parse_line

    assert parse_line("doctor --gpu").args.gpu is True and parse_line("doctor").args.gpu is False
    assert parse_line("doctor --help") is None
