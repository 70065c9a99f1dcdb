"""Stage ``serve``: a real Triton Inference Server on what normdeploy wrote (``normdeploy serve OUT_DIR``).

The server is the ``tritonserver`` binary (Triton 2.51) that the PyPI wheel
``nvidia-pytriton`` carries with its Python backend, run as a subprocess from a *serving
environment*: a Python venv holding ``nvidia-pytriton==0.7.0``, ``numpy<2`` and
``onnxruntime`` (``scripts/setup_serve.sh`` creates ``.serve-venv``). PyTriton's own
Python API is not used: it serves a Python callable of the calling process behind a
generated model, not the repository normdeploy writes. normdeploy's venv (numpy 2) only
starts the server and talks to it as a client. What the binary needs, and what
:class:`TritonServer` gives it:

* the backend stub for the serving venv's Python: the wheel ships the stubs apart
  (``python_backend_stubs/<X.Y>/``); a private ``backends/python/`` of symlinks (the
  backend library, its utils and that stub) is passed as ``--backend-directory``;
* the stub finds its Python through ``PATH`` (the serving venv's ``bin`` first;
  ``PYTHONPATH``/``PYTHONHOME``/``VIRTUAL_ENV`` removed) and links ``libpython3.X.so``
  (the interpreter's ``LIBDIR`` on ``LD_LIBRARY_PATH``);
* numpy < 2 in that environment: the 2.51 stub returns empty tensors under numpy 2
  (model.py also refuses to load there);
* ``--disable-auto-complete-config`` (2.51 has no flag-less ``--strict-model-config``):
  the entry is served exactly as written;
* every port bound to ``127.0.0.1`` unless told otherwise; its own session and process
  group, so a stub left by a killed server is reaped (``killpg``) with its ``/dev/shm``
  regions (a per-server prefix); the server gets SIGTERM if this process dies.

:func:`prepare_repository` picks what to serve from an output directory: its
``triton/`` entries when they are Python-backend ones (``--triton-backend python``),
otherwise a Python-backend variant of ``model.onnx`` with the same batching, written to a
temporary repository (PyPI's server has no ONNX Runtime or TensorRT backend).
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

from .core.errors import InputError, UnsupportedError

PYTRITON_VERSION = "0.7.0"
SETUP_HINT = ("run scripts/setup_serve.sh (creates .serve-venv), or pip install 'nvidia-pytriton==0.7.0' 'numpy<2' "
              "onnxruntime into a Python 3.8-3.13 venv and pass --serve-python PATH/bin/python")
DEFAULT_PORTS = (8000, 8001, 8002)  # Triton's own defaults: HTTP, gRPC, metrics
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import importlib.util, json, os, sys, sysconfig
from importlib.metadata import version, PackageNotFoundError
spec = importlib.util.find_spec("pytriton")
pkgs = {}
for name in ("numpy", "onnxruntime", "nvidia-pytriton"):
    try:
        pkgs[name] = version(name)
    except PackageNotFoundError:
        pkgs[name] = None
print(json.dumps({"pytriton": os.path.dirname(spec.origin) if spec and spec.origin else None,
                  "version": "%d.%d" % sys.version_info[:2], "bindir": os.path.dirname(sys.executable),
                  "libdir": sysconfig.get_config_var("LIBDIR") or "", "packages": pkgs}))
"""


class ServeError(InputError):
    """The server could not be started or stopped as asked; the message says why."""


def platform_problem() -> str | None:
    """Why the wheel's tritonserver cannot run on this platform at all, or None."""
    system, machine = platform.system(), platform.machine().lower()
    if system != "Linux":
        return f"nvidia-pytriton's tritonserver runs on Linux only, not {system}"
    if machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"nvidia-pytriton has no tritonserver for {machine}"
    return None


@dataclass
class ServeEnv:
    """A serving environment: its Python, and the parts of the nvidia-pytriton wheel installed there."""

    python: str
    bindir: str        # first on the server's PATH: the stub finds its interpreter there
    libdir: str        # the interpreter's libpython3.X.so, for LD_LIBRARY_PATH
    version: str       # "3.11"
    tritonserver: str
    backends: str      # the wheel's backends/ (the Python backend, without its stub)
    stub: str          # python_backend_stubs/<version>/triton_python_backend_stub
    libs: str          # nvidia_pytriton.libs (libtritonserver's dependencies)
    packages: dict = field(default_factory=dict)

    @staticmethod
    def candidates(python: str | None = None) -> list[str]:
        """Where a serving Python is looked for, in order."""
        if python:
            return [python]
        found = [os.environ["NORMDEPLOY_SERVE_PYTHON"]] if os.environ.get("NORMDEPLOY_SERVE_PYTHON") else []
        for root in (_CHECKOUT, os.getcwd()):
            found.append(os.path.join(root, ".serve-venv", "bin", "python"))
        found.append(sys.executable)  # normdeploy's own venv, where it holds nvidia-pytriton and numpy<2
        return list(dict.fromkeys(found))

    @classmethod
    def find(cls, python: str | None = None) -> ServeEnv:
        """The first usable serving environment; :class:`ServeError` naming what is wrong with the best one."""
        problems = []
        for candidate in cls.candidates(python):
            try:
                return cls.probe(candidate)
            except ServeError as e:
                problems.append((candidate, e))
                if python or candidate == os.environ.get("NORMDEPLOY_SERVE_PYTHON"):
                    raise  # asked for this one: say what is wrong with it
        # the most telling problem: one of an interpreter that has nvidia-pytriton, else "none found"
        for _, e in problems:
            if "nvidia-pytriton is not installed" not in e.message and "no Python at" not in e.message:
                raise e
        raise ServeError("no serving environment (a Python with nvidia-pytriton, numpy<2 and onnxruntime) found at "
                         + ", ".join(c for c, _ in problems), SETUP_HINT)

    @classmethod
    def probe(cls, python: str) -> ServeEnv:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ServeError(f"no Python at {python}", SETUP_HINT)
        try:
            run = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60)
            info = json.loads(run.stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            raise ServeError(f"cannot run {python} to look for nvidia-pytriton", SETUP_HINT) from None
        pkgs = info["packages"]
        if not info["pytriton"] or not pkgs.get("nvidia-pytriton"):
            raise ServeError(f"nvidia-pytriton is not installed for {python}", SETUP_HINT)
        root = os.path.join(info["pytriton"], "tritonserver")
        env = cls(python=python, bindir=info["bindir"], libdir=info["libdir"], version=info["version"],
                  tritonserver=os.path.join(root, "bin", "tritonserver"), backends=os.path.join(root, "backends"),
                  stub=os.path.join(root, "python_backend_stubs", info["version"], "triton_python_backend_stub"),
                  libs=os.path.join(os.path.dirname(info["pytriton"]), "nvidia_pytriton.libs"), packages=pkgs)
        if not os.path.isfile(env.tritonserver):
            raise ServeError(f"nvidia-pytriton {pkgs['nvidia-pytriton']} for {python} has no tritonserver binary "
                             f"({env.tritonserver})", f"install nvidia-pytriton=={PYTRITON_VERSION}")
        if not os.path.exists(env.stub):
            have = sorted(os.listdir(os.path.join(root, "python_backend_stubs")))
            raise ServeError(f"Triton's Python backend has no stub for Python {env.version} (it has {', '.join(have)})",
                             "build the serving venv with one of those Pythons (PYTHON=python3.11 "
                             "scripts/setup_serve.sh)")
        numpy_v, ort_v = pkgs.get("numpy"), pkgs.get("onnxruntime")
        if numpy_v is None or int(numpy_v.split(".")[0]) >= 2 or ort_v is None:
            raise ServeError(f"the serving environment {python} has numpy {numpy_v} and onnxruntime {ort_v}: it needs "
                             "numpy<2 (tritonserver 2.51's stub returns empty tensors under numpy 2) and onnxruntime",
                             SETUP_HINT)
        missing = env.missing_libraries()
        if missing:
            raise ServeError(f"the Python backend stub cannot load {', '.join(missing)}",
                             "the serving Python needs a shared libpython (Debian: apt-get install libpython3.X; "
                             "pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")
        return env

    def library_path(self) -> str:
        return os.pathsep.join([self.libs] + ([self.libdir] if self.libdir else []))

    def missing_libraries(self) -> list[str]:
        """Shared libraries the stub would not find with the server's LD_LIBRARY_PATH ([] without ldd)."""
        if not shutil.which("ldd"):
            return []
        env = dict(os.environ, LD_LIBRARY_PATH=self.library_path())
        try:
            out = subprocess.run(["ldd", self.stub], capture_output=True, text=True, timeout=30, env=env).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [line.split()[0] for line in out.splitlines() if "not found" in line]

    def binary_problem(self) -> str | None:
        """Why the tritonserver binary does not run here (a C library too old, say), or None."""
        try:
            run = subprocess.run([self.tritonserver, "--help"], capture_output=True, text=True, timeout=60,
                                 env=server_environment(self))
        except OSError as e:
            return f"{self.tritonserver} does not run here: {e.strerror or e}"
        except subprocess.TimeoutExpired:
            return f"{self.tritonserver} --help did not return within 60 s"
        text = run.stdout + run.stderr
        if "Usage: tritonserver" in text:
            return None
        return f"{self.tritonserver} does not run here: {(text.strip().splitlines() or ['no output'])[0][:200]}"


def server_environment(env: ServeEnv) -> dict:
    """The server's environment: the serving venv first on PATH, its libraries found, nothing of ours leaking in."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONNOUSERSITE")}
    out["PATH"] = env.bindir + os.pathsep + out.get("PATH", "/usr/bin:/bin")
    out["LD_LIBRARY_PATH"] = os.pathsep.join([env.library_path()] + ([out["LD_LIBRARY_PATH"]]
                                                                     if out.get("LD_LIBRARY_PATH") else []))
    out["PYTHONNOUSERSITE"] = "1"
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def port_free(address: str, port: int) -> bool:
    """Whether a server could listen on ``address:port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _die_with_parent():
    """A ``preexec_fn`` asking Linux for SIGTERM (Triton's graceful stop) when the starting thread dies, or None.

    ``prctl`` is looked up here, in the parent: the child, forked while other threads may
    hold the dynamic loader's lock, only makes the call.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class TritonServer:
    """A ``tritonserver`` subprocess serving ``model_repository``; a context manager.

    ``ports`` are (HTTP, gRPC, metrics); 0 or None picks a free one (kept across
    :meth:`restart`). :meth:`start` returns once the server and every entry (or
    ``models``) report READY, or raises :class:`ServeError` with the log's error lines.
    :meth:`stop` sends SIGINT (Triton finishes in-flight requests for
    ``exit_timeout_secs``) and SIGKILL after ``stop_timeout``; :meth:`kill` is a crash.
    Both reap the process group and the server's shared-memory regions. The server gets
    SIGTERM when the thread that started it ends (Linux): start it from a thread that
    outlives it.
    """

    def __init__(self, model_repository: str, *, env: ServeEnv | None = None, models: list[str] | None = None,
                 address: str = "127.0.0.1", ports: tuple[int | None, int | None, int | None] = (None, None, None),
                 start_timeout: float = 60.0, stop_timeout: float = 15.0, exit_timeout_secs: int = 5,
                 log_verbose: int = 0, workdir: str | None = None):
        self.repo = os.path.abspath(model_repository)
        self.env = env or ServeEnv.find()
        self.models = models
        self.address = address
        self.requested_ports = tuple(ports)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.exit_timeout_secs, self.log_verbose = exit_timeout_secs, log_verbose
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="normdeploy-triton-")
        self.log_path = os.path.join(self.workdir, "tritonserver.log")
        self.proc: subprocess.Popen | None = None
        self.ports: tuple[int, int, int] | None = None
        self.startup_s: float | None = None
        self.last_reap: dict | None = None
        self.shm_prefix = f"normdeploy_triton_{uuid.uuid4().hex[:12]}_"
        self._backends = self._backend_dir()

    # -- layout and command line --------------------------------------------------------
    def _backend_dir(self) -> str:
        """``<workdir>/backends/python/``: the wheel's backend library and utils, and the stub for our Python."""
        d = os.path.join(self.workdir, "backends", "python")
        os.makedirs(d, exist_ok=True)
        src = os.path.join(self.env.backends, "python")
        links = {"libtriton_python.so": os.path.join(src, "libtriton_python.so"),
                 "triton_python_backend_utils.py": os.path.join(src, "triton_python_backend_utils.py"),
                 "triton_python_backend_stub": self.env.stub}
        for name, target in links.items():
            if not os.path.lexists(os.path.join(d, name)):
                os.symlink(target, os.path.join(d, name))
        openvino = os.path.join(self.env.backends, "openvino")  # absent from nvidia-pytriton 0.7.0's wheel
        if os.path.isdir(openvino) and not os.path.lexists(os.path.join(os.path.dirname(d), "openvino")):
            os.symlink(openvino, os.path.join(os.path.dirname(d), "openvino"))
        return os.path.dirname(d)

    def command(self) -> list[str]:
        http, grpc, metrics = self.ports
        return [self.env.tritonserver, f"--model-repository={self.repo}", f"--backend-directory={self._backends}",
                f"--http-address={self.address}", f"--http-port={http}",
                f"--grpc-address={self.address}", f"--grpc-port={grpc}",
                "--allow-metrics=true", "--allow-gpu-metrics=false",
                f"--metrics-address={self.address}", f"--metrics-port={metrics}",
                "--allow-sagemaker=false", "--allow-vertex-ai=false",
                "--disable-auto-complete-config", "--strict-readiness=true", "--exit-on-error=true",
                "--model-control-mode=none", f"--exit-timeout-secs={self.exit_timeout_secs}",
                "--pinned-memory-pool-byte-size=0",  # no CUDA here: no pinned pool
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--log-verbose={self.log_verbose}", "--log-info=true", "--log-warning=true", "--log-error=true"]

    # -- addresses ----------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports[0]}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports[2]}/metrics"

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_errors(self, since: int = 0, limit: int = 2000) -> str:
        """The log's error lines (Triton starts them with E) since offset ``since``, else its tail."""
        text = self.log_text()[since:]
        errors = [line for line in text.splitlines()
                  if (line.startswith("E") or line.startswith("error:") or "Failed to initialize Python stub" in line
                      or "ModelException" in line) and "CudaDriverHelper has not been initialized" not in line]
        return ("\n".join(errors) or text)[-limit:].strip()

    # -- lifecycle ----------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 1.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def expected_models(self) -> list[str]:
        if self.models is not None:
            return list(self.models)
        return sorted(n for n in os.listdir(self.repo)
                      if not n.startswith(".") and os.path.isfile(os.path.join(self.repo, n, "config.pbtxt")))

    def is_ready(self) -> bool:
        if self.ports is None or self._get("/v2/health/ready") != 200:
            return False
        return all(self._get(f"/v2/models/{m}/ready") == 200 for m in self.expected_models())

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _pick_ports(self, fresh: bool) -> tuple[int, int, int]:
        chosen = []
        for i, want in enumerate(self.requested_ports):
            if want:
                chosen.append(int(want))
            elif self.ports is not None and not fresh:
                chosen.append(self.ports[i])
            else:
                chosen.append(free_port(self.address if self.address not in ("", "0.0.0.0") else "127.0.0.1"))
        return tuple(chosen)

    def start(self) -> TritonServer:
        if self.running():
            raise ServeError("this tritonserver is already running", "stop it first")
        fixed = all(self.requested_ports)
        tries = 1 if fixed else 3
        for attempt in range(tries):
            self.ports = self._pick_ports(fresh=attempt > 0)
            mark = len(self.log_text())
            try:
                return self._start_once(mark)
            except ServeError:
                clash = any(p in self.log_text()[mark:].lower() for p in ("already in use", "failed to start"))
                if attempt + 1 == tries or not clash:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, mark: int) -> TritonServer:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=server_environment(self.env), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True, preexec_fn=_die_with_parent())
        deadline = t0 + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._reap()
                raise ServeError(f"tritonserver exited with status {code} before it was ready: "
                                 + " | ".join(self.log_errors(mark).splitlines()[-4:]),
                                 f"see the whole log in {self.log_path}")
            if self.is_ready():
                self.startup_s = time.monotonic() - t0
                return self
            time.sleep(0.05)
        errors = self.log_errors(mark)
        self.stop()
        raise ServeError(f"tritonserver was not ready within {self.start_timeout:.0f} s: "
                         + " | ".join(errors.splitlines()[-4:]), f"see the whole log in {self.log_path}")

    def stop(self) -> int | None:
        """SIGINT, then SIGKILL past ``stop_timeout``; returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reap()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server (a crash, for tests), then reap what it leaves."""
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reap()

    def restart(self) -> TritonServer:
        self.stop()
        return self.start()

    def _reap(self, grace: float = 2.0) -> None:
        """What is left of the server's process group (stubs of a killed server), then its shared memory.

        An idle stub notices its SIGKILLed server within about a second; one that was serving a
        request when the server died stays for good (seen: over a minute), holding its shared
        memory and its ONNX Runtime session: after ``grace`` seconds the group gets SIGKILL.
        """
        if self.proc is None:
            return
        pgid, t0, killed = self.proc.pid, time.monotonic(), False
        while time.monotonic() - t0 < grace and _group_alive(pgid):
            time.sleep(0.05)
        if _group_alive(pgid):
            killed = True
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while time.monotonic() - t0 < grace + 5 and _group_alive(pgid):
                time.sleep(0.05)
        self.last_reap = {"group_gone_s": round(time.monotonic() - t0, 3), "group_killed": killed,
                          "group_alive": _group_alive(pgid)}
        for path in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- an output directory

@dataclass
class Served:
    """One model as the server serves it, and what to tell a client about it."""

    name: str
    backend: str
    max_batch_size: int
    inputs: list[dict]    # {"name", "datatype" (FP32, INT64, ...), "shape" of one example request}
    outputs: list[str]
    note: str = ""


_TRITON_TO_CLIENT = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_FP64": "FP64", "TYPE_INT64": "INT64",
                     "TYPE_INT32": "INT32", "TYPE_INT8": "INT8", "TYPE_UINT8": "UINT8", "TYPE_BOOL": "BOOL",
                     "TYPE_BF16": "BF16"}


def _served(entry: dict, examples: dict[str, list[int]], note: str = "") -> Served:
    """``entry`` (report.json's ``triton``) for a client; an open axis takes the size of the example input."""
    mbs = entry["max_batch_size"]
    inputs = []
    for n, dims in entry["inputs"].items():
        example = examples.get(n) or []
        off = 1 if mbs > 0 else 0
        sizes = [d if d > 0 else (example[i + off] if i + off < len(example) else 1) for i, d in enumerate(dims)]
        inputs.append({"name": n, "datatype": None, "shape": ([1] if mbs > 0 else []) + sizes})
    return Served(entry["name"], entry["backend"], mbs, inputs, list(entry["outputs"]), note)


def read_output(out_dir: str) -> tuple[dict, dict]:
    """``report.json`` of an output directory and its Triton entry's summary; :class:`InputError` otherwise."""
    what = f"run `normdeploy optimize MODEL --out {out_dir} --triton-backend python` first"
    if not os.path.isdir(out_dir):
        raise InputError(f"{out_dir} is not a directory", what)
    try:
        with open(os.path.join(out_dir, "report.json")) as f:
            report = json.load(f)
        report["target"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{out_dir} is not an output directory of normdeploy optimize (no readable report.json)",
                         what) from None
    entry = report.get("triton")
    if not isinstance(entry, dict) or not os.path.isfile(os.path.join(out_dir, "triton", str(entry.get("name")),
                                                                       "config.pbtxt")):
        raise InputError(f"{out_dir} has no Triton entry described in its report.json (--lower-only outputs, and "
                         "those of normdeploy before `serve`, have none)", what.replace(" first", ""))
    return report, entry


#: Triton backends served as written (no Python-backend variant), and the library each needs in ``backends/``
NATIVE_BACKENDS = {"openvino": "openvino/libtriton_openvino.so"}


def backend_problem(entry: dict, env: ServeEnv) -> str | None:
    """Why ``env``'s tritonserver cannot serve ``entry`` as written, or None.

    An ``openvino`` entry (target openvino) is served by Triton's OpenVINO backend or not at all:
    a Python-backend variant would run ONNX Runtime, not what was verified and timed.
    nvidia-pytriton 0.7.0's tritonserver ships the Python backend only.
    """
    need = NATIVE_BACKENDS.get(entry.get("backend"))
    if need and not os.path.isfile(os.path.join(env.backends, need)):
        return (f"triton/{entry.get('name')} is an {entry['backend']} entry and this tritonserver ({env.tritonserver}) "
                f"has no {entry['backend']} backend ({os.path.join(env.backends, need)} is missing)")
    return None


def prepare_repository(out_dir: str, workdir: str) -> tuple[str, list[Served]]:
    """The model repository to serve for ``out_dir``, and what it serves.

    ``out_dir/triton`` itself when its entry is a Python-backend one; otherwise a
    Python-backend variant of ``out_dir/model.onnx`` in ``workdir/repository``, with the
    entry's name, and its ``max_batch_size`` and preferred batch sizes where it batches.
    Raises :class:`InputError` for a directory normdeploy did not write.
    """
    import onnx

    from .package.triton import _TYPES, _signature, plan_entry, write_repository
    from .package.triton_python import entry_parameters, served_onnx

    out_dir = os.path.abspath(out_dir)
    report, entry = read_output(out_dir)
    target = report["target"]
    triton_dir = os.path.join(out_dir, "triton")
    model_path = os.path.join(out_dir, "model.onnx")
    what = f"run `normdeploy optimize MODEL --out {out_dir}` again"
    examples = {i["name"]: list(i["shape"]) for i in (report.get("input") or {}).get("inputs", [])
                if isinstance(i, dict) and "name" in i and "shape" in i}

    def dtypes(model) -> dict[str, str]:
        inputs, _ = _signature(model)
        return {v.name: _TRITON_TO_CLIENT[_TYPES[v.type.tensor_type.elem_type]] for v in inputs}

    if entry["backend"] == "python":
        served = _served(entry, examples)
        model = onnx.load(os.path.join(triton_dir, entry["name"], "1", "model.onnx"), load_external_data=False)
        for i in served.inputs:
            i["datatype"] = dtypes(model)[i["name"]]
        return triton_dir, [served]
    if not os.path.isfile(model_path):
        raise InputError(f"{model_path} is missing", what)
    if entry["backend"] in NATIVE_BACKENDS:  # served as written (serve() checked the backend is there)
        served = _served(entry, examples)
        model = onnx.load(model_path, load_external_data=False)
        for i in served.inputs:
            i["datatype"] = dtypes(model)[i["name"]]
        return triton_dir, [served]
    model = served_onnx(onnx.load(model_path), target)
    repo = os.path.join(workdir, "repository")
    mbs = entry["max_batch_size"]
    batching = {"max_batch_size": mbs if mbs > 0 else None,
                "preferred_batch_sizes": entry.get("preferred_batch_sizes") or None}
    write_repository(repo, entry["name"], model, backend="python", **batching)
    planned = plan_entry(model, entry["name"], "python", parameters=entry_parameters(), **batching)
    plugins = " (TensorRT plugins as ONNX functions)" if target.startswith("trt-") else ""
    note = (f"triton/{entry['name']} is a {entry['backend']} entry, which this tritonserver (Python backend only) "
            f"cannot load: serving model.onnx{plugins} with ONNX Runtime in the Python backend instead")
    served = _served(planned.to_json(), examples, note)
    for i in served.inputs:
        i["datatype"] = dtypes(model)[i["name"]]
    return repo, [served]


def client_snippet(url: str, served: Served) -> str:
    """Python that queries ``served`` over HTTP at ``url`` with one example request (printed by ``serve``)."""
    np_types = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT64": "int64", "INT32": "int32",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool_"}
    lines = ["import numpy as np", "import tritonclient.http as httpclient", "",
             f'client = httpclient.InferenceServerClient("{url}")', "inputs = []"]
    for i in served.inputs:
        lines += [f'x = np.ones({i["shape"]}, np.{np_types.get(i["datatype"], "float32")})',
                  f'inputs.append(httpclient.InferInput("{i["name"]}", list(x.shape), "{i["datatype"]}"))',
                  "inputs[-1].set_data_from_numpy(x)"]
    lines.append(f'print(client.infer("{served.name}", inputs).as_numpy("{served.outputs[0]}").shape)')
    return "\n".join(lines)


def _echo(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def check_ports(address: str, ports: dict[str, int]) -> None:
    for label, port in ports.items():
        if port and not port_free(address, port):
            raise InputError(f"port {port} on {address} is in use ({label})",
                             f"stop what listens there, or pass --{label.lower()}-port with a free port (0 picks one)")


def serve(out_dir: str, *, address: str = "127.0.0.1", http_port: int = DEFAULT_PORTS[0],
          grpc_port: int = DEFAULT_PORTS[1], metrics_port: int = DEFAULT_PORTS[2], python: str | None = None,
          start_timeout: float = 120.0, echo=None, as_json: bool = False) -> int:
    """``normdeploy serve OUT_DIR``: start the server, print how to query it, serve until SIGINT/SIGTERM.

    Returns the exit status: 0 after a clean stop, 1 when the server died on its own.
    """
    echo = echo or _echo
    problem = platform_problem()
    if problem:
        raise UnsupportedError(problem, "serve on a Linux x86_64 or aarch64 machine, or use NGC's tritonserver image")
    _, entry = read_output(os.path.abspath(out_dir))  # a directory normdeploy wrote, before anything else
    check_ports(address, {"HTTP": http_port, "gRPC": grpc_port, "metrics": metrics_port})
    env = ServeEnv.find(python)
    problem = backend_problem(entry, env)
    if problem:
        raise UnsupportedError(problem, "serve it from NGC's tritonserver image (it has the OpenVINO backend), or "
                                        "write the output with --triton-backend python (ONNX Runtime in Triton)")
    workdir = tempfile.mkdtemp(prefix="normdeploy-serve-")
    server = None
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        if stopping["signal"] is not None:
            return  # already stopping: stop() has its own bound
        stopping["signal"] = signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    keep = False  # the work directory (and the log in it) stays where the server failed
    try:
        repo, served = prepare_repository(out_dir, workdir)
        server = TritonServer(repo, env=env, models=[s.name for s in served], address=address,
                              ports=(http_port, grpc_port, metrics_port), start_timeout=start_timeout,
                              workdir=workdir)
        server.start()
        if as_json:
            echo(json.dumps({"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url,
                             "repository": repo, "log": server.log_path,
                             "models": [s.__dict__ for s in served]}))
        else:
            for s in served:
                if s.note:
                    echo(f"note: {s.note}")
            names = ", ".join(f"'{s.name}' ({s.backend} backend, max_batch_size {s.max_batch_size})" for s in served)
            echo(f"tritonserver ready in {server.startup_s:.1f} s: {names}; repository {repo}; log {server.log_path}")
            echo(f"  HTTP     http://{server.http_url}   (curl http://{server.http_url}/v2/models/{served[0].name})")
            echo(f"  gRPC     {server.grpc_url}")
            echo(f"  metrics  {server.metrics_url}")
            echo("  query it from Python (pip install 'tritonclient[http]'):")
            snippet = client_snippet(server.http_url, served[0]).splitlines()
            echo("\n".join("    " + line if line else "" for line in snippet))
            echo("Ctrl-C stops it.")
        sys.stdout.flush()
        while server.running():
            time.sleep(0.2)
        tail = " | ".join(server.log_errors().splitlines()[-3:])
        echo(f"error: tritonserver exited on its own with status {server.proc.returncode}: {tail}; "
             f"see {server.log_path}", err=True)
        keep = True
        return 1
    except ServeError:
        keep = True
        raise
    except KeyboardInterrupt:
        if server is not None:
            code = server.stop()
            if not as_json:
                echo(f"stopped (tritonserver exit status {code})")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server is not None:
            server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
