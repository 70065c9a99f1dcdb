"""A real Triton Inference Server (tritonserver 2.51 from nvidia-pytriton) on repositories normdeploy wrote.

The server runs from the serving environment (``scripts/setup_serve.sh`` creates
``.serve-venv``; :class:`normdeploy.serve.ServeEnv` finds it). Where the binary cannot run
on this platform the tests skip with the reason printed; where only the serving
environment is missing they skip too, unless ``NORMDEPLOY_REQUIRE_TRITON=1`` (set by
``.ci/run``), which makes that a failure. One server per repository for the session,
bound to 127.0.0.1 on free ports, started with a time bound and always stopped.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import MODELS

REQUIRE = os.environ.get("NORMDEPLOY_REQUIRE_TRITON") == "1"
_SKIPPED: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED:
        terminalreporter.write_line(f"tests/serve skipped: {_SKIPPED[0]}")


def _skip(reason: str):
    _SKIPPED.append(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def serve_env():
    from normdeploy.serve import ServeEnv, ServeError, platform_problem

    problem = platform_problem()
    if problem:
        _skip(problem)
    try:
        env = ServeEnv.find()
    except ServeError as e:
        if REQUIRE:
            pytest.fail(f"NORMDEPLOY_REQUIRE_TRITON=1 but no usable serving environment: {e}")
        _skip(f"no serving environment: {e}")
    problem = env.binary_problem()
    if problem:  # the platform cannot run the wheel's binary (a C library too old, say)
        _skip(problem)
    return env


class Model:
    """One model of models/ as normdeploy wrote it, with what the tests feed and expect."""

    def __init__(self, out: str, report: dict, x: np.ndarray):
        from benchmarks.serving import ort_session

        self.out, self.report, self.x = out, report, x
        self.name = report["triton"]["name"]
        self.max_batch = report["triton"]["max_batch_size"]
        self.session = ort_session(os.path.join(out, "model.onnx"))
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.dims = report["triton"]["inputs"][self.input]
        self.datatype = {"float32": "FP32", "int64": "INT64"}[x.dtype.name]

    def ort(self, idx) -> np.ndarray:
        """ONNX Runtime in-process on the samples ``idx``, as one batch (what the server gets from one client)."""
        return self.session.run([self.output], {self.input: np.ascontiguousarray(self.x[idx])})[0]

    def reference(self) -> np.ndarray:
        """ONNX Runtime in-process, one sample at a time: the answer whatever the batch-mates."""
        return np.concatenate([self.ort([i]) for i in range(len(self.x))])


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    """normdeploy optimize --triton-backend python for two models of models/ (an image CNN and a token
    model), each written to its own output directory and into one shared repository (--triton-repo)."""
    import normdeploy

    base = tmp_path_factory.mktemp("serving")
    repo = str(base / "repository")
    models = {}
    for key, path, data, field in (("digits", "digits_cnn_bn_un.pt", "digits_test.npz", "input"),
                                   ("llama", "llama_rmsnorm.pt", "seq_test.npz", "input_ids")):
        result = normdeploy.optimize(os.path.join(MODELS, path), bench=False)
        out = result.save(str(base / key), triton_repo=repo, triton_backend="python")
        models[key] = Model(out, result.report, np.load(os.path.join(MODELS, data))[field][:360])
    return repo, models


@pytest.fixture(scope="session")
def models(repository):
    return repository[1]


@pytest.fixture(scope="session")
def server(serve_env, repository):
    from normdeploy.serve import TritonServer

    srv = TritonServer(repository[0], env=serve_env, start_timeout=120)
    try:
        srv.start()
        yield srv
    finally:
        srv.close()
