import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


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
