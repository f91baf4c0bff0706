"""A validated launch request: everything checked before anything is created."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from . import validation
from .errors import BadRequest
from .gpus.sizing import validate_model_name

KINDS = ("llm", "embedding")
SCOPES = ("server", "kernel")  # kernel: stopped when the kernel that started it ends (engines/scope.py)
FOREVER = -1.0
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# Flags sage_nb sets itself; an engine may not override them through extra_args.
MANAGED_FLAGS = ("--model", "--host", "--port", "--api-key", "--served-model-name",
                 "--tensor-parallel-size", "-tp", "--max-model-len", "--dtype",
                 "--gpu-memory-utilization", "--uds", "--enable-lora", "--max-loras", "--max-lora-rank",
                 "--lora-modules", "--max-cpu-loras")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16


@dataclass
class LaunchRequest:
    """The arguments of ``start_engine``, as the REST body, magics and Python share them."""

    model: str
    kind: str = "llm"
    name: str | None = None
    tensor_parallel_size: int = 1
    gpu_ids: list[int] | None = None
    node: str | None = None  # the node to run on (None: whichever fits best)
    port: int | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    extra_args: list[str] = field(default_factory=list)
    keep_alive: float | str | None = None  # None: the server's default; -1 or "forever": forever
    kernel_id: str | None = None  # the kernel that starts it (the kernel client fills it in)
    notebook: str | None = None  # that kernel's notebook, as Jupyter knows its path
    scope: str = "server"  # "kernel": stopped when that kernel shuts down
    shared: bool = False  # published by the box service to every user of the box (a user's server forwards it)
    publisher: str | None = None  # who published a shared engine: set by the box service, never by a caller
    lora: bool = False  # started with --enable-lora: adapters can be loaded while it runs (controlplane/adapters)
    max_loras: int | None = None  # adapters in one batch (vLLM's --max-loras; default 4 with lora)
    max_lora_rank: int | None = None  # the largest adapter rank it takes (--max-lora-rank; default 16)
    adapters: dict[str, str] | None = None  # name -> path: loaded once it is ready (implies lora)

    def __post_init__(self) -> None:
        validate_model_name(self.model)
        if isinstance(self.model, str) and Path(self.model).expanduser().is_dir():
            self.model = str(Path(self.model).expanduser().resolve())
        if self.kind not in KINDS:
            raise BadRequest(f"unknown kind {self.kind!r}: use 'llm' or 'embedding'")
        if self.name is not None:
            validation.engine_name(self.name)
        self.tensor_parallel_size = validation.integer("tensor_parallel_size", self.tensor_parallel_size)
        self.port = validation.port(self.port)
        self.max_model_len = validation.optional_integer("max_model_len", self.max_model_len, 16)
        if self.gpu_ids is not None:
            if not isinstance(self.gpu_ids, (list, tuple)):
                raise BadRequest("gpu_ids must be a list of GPU indices")
            self.gpu_ids = [validation.integer("gpu id", g, 0) for g in self.gpu_ids]
            if len(set(self.gpu_ids)) != len(self.gpu_ids):
                raise BadRequest(f"gpu_ids has duplicates: {self.gpu_ids}")
            if self.tensor_parallel_size == 1 and len(self.gpu_ids) > 1:
                self.tensor_parallel_size = len(self.gpu_ids)
        self.node = validation.node(self.node)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BadRequest(f"unknown dtype {self.dtype!r}: one of {', '.join(DTYPES)}")
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1):
            raise BadRequest(f"gpu_memory_utilization must be a number in (0, 1], got {u!r}")
        self.extra_args = self._check_args(self.extra_args)
        self.kernel_id = validation.kernel_id(self.kernel_id)
        self.notebook = validation.notebook_path(self.notebook)
        if self.scope not in SCOPES:
            raise BadRequest(f"unknown scope {self.scope!r}: use 'server' (the engine outlives its kernel) "
                             "or 'kernel' (stopped when its kernel shuts down)")
        if self.scope == "kernel" and self.kernel_id is None:
            raise BadRequest("scope 'kernel' needs the kernel_id of the kernel it is tied to "
                             "(%llm start in a Jupyter kernel sends it)")
        if not isinstance(self.shared, bool):
            raise BadRequest(f"shared must be true or false, got {self.shared!r}")
        if self.shared and self.scope == "kernel":
            raise BadRequest("a shared engine serves every user of the box: it cannot be tied to one kernel "
                             "(scope 'kernel')")
        if self.publisher is not None:
            validation.user_name(self.publisher)
        self._check_lora()
        if self.keep_alive is not None:
            seconds = validation.duration("keep_alive", self.keep_alive)
            self.keep_alive = FOREVER if seconds is None else seconds

    def _check_lora(self) -> None:
        if not isinstance(self.lora, bool):
            raise BadRequest(f"lora must be true or false, got {self.lora!r}")
        if self.adapters is not None:
            if not isinstance(self.adapters, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.adapters.items()):
                raise BadRequest("adapters must map adapter names to adapter directories: {\"name\": \"path\"}")
            for name in self.adapters:
                validation.adapter_name(name)
            self.adapters = {k: str(Path(v).expanduser().resolve()) if Path(v).expanduser().is_dir() else v
                             for k, v in self.adapters.items()}
        if self.max_loras is not None or self.max_lora_rank is not None or self.adapters:
            self.lora = True
        if not self.lora:
            return
        if self.kind != "llm":
            raise BadRequest("LoRA adapters are for LLM engines; an embedding engine cannot take them")
        self.max_loras = validation.integer("max_loras", DEFAULT_MAX_LORAS if self.max_loras is None
                                            else self.max_loras, 1)
        rank = DEFAULT_MAX_LORA_RANK if self.max_lora_rank is None else self.max_lora_rank
        if isinstance(rank, bool) or rank not in LORA_RANKS:
            raise BadRequest(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))} "
                             f"(vLLM's choices), got {rank!r}")
        self.max_lora_rank = rank

    def keep_alive_s(self, default: float | None) -> float | None:
        """The engine's keep-alive in seconds (``None``: forever), ``default`` when not given."""
        if self.keep_alive is None:
            return default
        return None if self.keep_alive == FOREVER else float(self.keep_alive)

    @staticmethod
    def _check_args(args) -> list[str]:
        if args is None:
            return []
        if isinstance(args, str) or not isinstance(args, (list, tuple)):
            raise BadRequest("extra_args must be a list of strings")
        for a in args:
            if not isinstance(a, str) or "\x00" in a:
                raise BadRequest(f"extra_args holds an invalid argument {a!r}")
            flag = a.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                raise BadRequest(f"{flag} is set by sage_nb; use the matching start option instead")
        return list(args)

    @classmethod
    def from_body(cls, body) -> LaunchRequest:
        """Build from a JSON body; unknown keys and wrong types are a :class:`BadRequest`."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        if "model" not in body:
            raise BadRequest("'model' is required")
        if "keep_alive" in body and body["keep_alive"] is None:  # JSON null: forever, as -1
            body = {**body, "keep_alive": FOREVER}
        return cls(**body)
