"""`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): replicas stay identical, and equal a one-process
run with the same global batch (every sample's rows and random draws are the global batch's: rng.Shard)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs_data

WORKER = r'''
import sys
from safetensors.torch import save_file
from accelerate import PartialState
from imagine_flash import train
from imagine_flash.config import DistillConfig

seen = {}
real_ema_update = train.ema_update
def record(ema, net, decay):  # the unwrapped live student of this process
    seen["student"] = net
    real_ema_update(ema, net, decay)
train.ema_update = record
out, teacher = sys.argv[1], sys.argv[2]
cfg = DistillConfig(out=out, teacher=teacher, batch_size=4, k=2, max_steps=2, ckpt_every=2, sample_every=100,
                    log_every=1, eval_samples=0, adv_weight=0.1, threads=1)
train.distill(cfg)
state = PartialState()
save_file({k: v.contiguous() for k, v in seen["student"].state_dict().items()},
          f"{out}/rank{state.process_index}of{state.num_processes}.safetensors")
'''


@needs_data
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_teacher):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no ACCELERATE_USE_CPU: distill picks gloo on a CPU machine
    for name, cmd in (("two", [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]),
                      ("one", [sys.executable])):
        r = subprocess.run(cmd + [str(tmp_path / "worker.py"), str(tmp_path / name), str(tiny_teacher)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    r0 = load_file(tmp_path / "two" / "rank0of2.safetensors")
    r1 = load_file(tmp_path / "two" / "rank1of2.safetensors")
    one = load_file(tmp_path / "one" / "rank0of1.safetensors")
    init = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(one[k], init[k].float()) for k in one)  # training moved the weights
    for k in one:
        assert torch.equal(r0[k], r1[k]), k  # DDP replicas are bitwise identical
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=2e-5)  # 2 processes = 1 process, same global batch
    # Only the main process writes the run folder; its checkpoint holds the same weights.
    ck = load_file(tmp_path / "two" / "ckpt" / "student.safetensors")
    for k in one:
        assert torch.equal(ck[k], r0[k])
