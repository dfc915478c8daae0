"""`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): replicas stay identical, and equal a one-process
run with the same global batch (every sample's rows and random draws are the global batch's: rng.Shard)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from imagine_flash.checkpoint import latest

from conftest import needs_data

ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]

WORKER = r'''
import sys
from safetensors.torch import save_file
from imagine_flash import cli, train

seen = {}
real_ema_update, real_distill = train.ema_update, train.distill
def record(ema, net, decay):  # the unwrapped live student of this process
    seen["student"] = net
    real_ema_update(ema, net, decay)
def distill(cfg, resume=False):  # the CLI's own call; each process saves its replica when training ends
    import torch.distributed as dist
    student = real_distill(cfg, resume)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    save_file({k: v.contiguous() for k, v in seen["student"].state_dict().items()},
              f"{cfg.out}/rank{rank}of{world}.safetensors")
    return student
train.ema_update, train.distill = record, distill
out, teacher, eval_samples = sys.argv[1], sys.argv[2], sys.argv[3]
sys.exit(cli.main(["distill", "--teacher", teacher, "--out", out, "--max-steps", "2", "--eval-samples", eval_samples,
                   *[a for kv in ("batch_size=4", "k=2", "ckpt_every=2", "sample_every=100", "log_every=1",
                                  "adv_weight=0.1", "threads=1", "fid_reference=16", "teacher_dtype=fp32") for a in ("--set", kv)]]))
'''


def _spawn(argv, env, log_path):
    """Start a process with stdout and stderr in one log file; (process, log)."""
    log = open(log_path, "w+")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log


def _output(proc, log) -> str:
    """Wait for a process from _spawn; it must exit 0. Its output."""
    code = proc.wait(timeout=600)
    log.seek(0)
    text = log.read()
    log.close()
    assert code == 0, text[-3000:]
    return text


@needs_data
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_teacher):
    """`accelerate launch --multi_gpu --num_processes 2` of the `imagine-flash distill` CLI, with evaluation: both
    processes exit 0 (no gloo teardown abort), only the main process evaluates, and the replicas equal each other and
    a one-process run of the same command (which skips the evaluation: it does not change the weights)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no ACCELERATE_USE_CPU: distill picks gloo on a CPU machine
    jobs = [_spawn(cmd + [str(tmp_path / "worker.py"), str(tmp_path / name), str(tiny_teacher), evals], env,
                   tmp_path / f"{name}.log")  # side by side (one thread per process)
            for name, cmd, evals in (("two", [launcher, "launch", "--multi_gpu", "--num_processes", "2",
                                              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                                              "no", "--main_process_port", "29517"], "4"),
                                     ("one", [sys.executable], "0"))]
    for output in (_output(*job) for job in jobs):
        assert output.count("student written to") == 1, output[-3000:]  # one process reports
    assert (tmp_path / "two" / "metrics.json").is_file()  # written by the one process that evaluated
    r0 = load_file(tmp_path / "two" / "rank0of2.safetensors")
    r1 = load_file(tmp_path / "two" / "rank1of2.safetensors")
    one = load_file(tmp_path / "one" / "rank0of1.safetensors")
    init = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(one[k], init[k].float()) for k in one)  # training moved the weights
    for k in one:
        assert torch.equal(r0[k], r1[k]), k  # DDP replicas are bitwise identical
        # 2 processes = 1 process with the same global batch, up to the rounding of a gradient summed in another
        # order. Adam divides by sqrt(v): where a gradient is near zero that rounding can move a weight by up to lr
        # per update (one element of 9,216 by 3.4e-5 on an AVX2 CPU), so: every weight within 2 updates x lr = 2e-4,
        # and all but 0.1% of them within float32 rounding.
        diff = (r0[k] - one[k]).abs()
        assert diff.max() <= 2e-4 + 1e-6, (k, diff.max())
        far = diff > 2e-5 + 1e-4 * one[k].abs()
        assert far.sum() <= max(1, far.numel() // 1000), (k, int(far.sum()), diff.max())
    # Only the main process writes the run folder; its checkpoint holds the same weights.
    ck = load_file(latest(tmp_path / "two") / "student.safetensors")
    for k in one:
        assert torch.equal(ck[k], r0[k])


FSDP_WORKER = r'''
import copy, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from imagine_flash import checkpoint
from torch.distributed.tensor import DTensor
from imagine_flash.backend import finish
from imagine_flash.dist import all_finite, full_tensor

dist.init_process_group("gloo")
rank, run = dist.get_rank(), __import__("pathlib").Path(sys.argv[1])
torch.manual_seed(0)
def make():
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
def shard(m):
    fully_shard(m[0]); fully_shard(m[2]); fully_shard(m)
    return m
x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))  # the same batch on both ranks
def step(model, opt):
    model(x).square().mean().backward(); opt.step(); opt.zero_grad()
def full(m):
    return [full_tensor(p.detach()) for p in m.parameters()]
def close(a, b):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)

ref = make()
sh = shard(copy.deepcopy(ref))
assert all(isinstance(p, DTensor) for p in sh.parameters()) and not any(isinstance(p, DTensor) for p in ref.parameters())
assert all(p.to_local().numel() < p.numel() for p in sh.parameters() if p.ndim == 2)  # each rank holds a shard
ema_ref, ema_sh = copy.deepcopy(ref).requires_grad_(False), copy.deepcopy(ref).requires_grad_(False)
opt_ref, opt_sh = torch.optim.Adam(ref.parameters(), 1e-2), torch.optim.Adam(sh.parameters(), 1e-2)
for _ in range(3):
    step(ref, opt_ref); step(sh, opt_sh)
    checkpoint.ema_update(ema_ref, ref, 0.9); checkpoint.ema_update(ema_sh, sh, 0.9)
close(full(sh), full(ref))
close(list(ema_sh.parameters()), list(ema_ref.parameters()))  # the EMA of gathered shards = the unsharded EMA
assert bool(all_finite(sh))

# Checkpoint from the sharded run: every rank gathers, rank 0 writes whole tensors.
checkpoint.save_checkpoint(run, 3, {"student": sh, "ema": ema_sh}, {"g": (sh, opt_sh)}, {}, write=rank == 0)
dist.barrier()
from safetensors.torch import load_file
saved = load_file(checkpoint.latest(run) / "student.safetensors")
close([saved[k] for k in ref.state_dict()], list(ref.state_dict().values()))

# Resume into a fresh sharded model (weights before sharding, optimiser after) and into a plain one: one more step
# of each equals one more step of the uninterrupted reference.
fresh_sh, fresh_plain = make(), make()
checkpoint.load_checkpoint(run, {"student": fresh_sh}, {})
shard(fresh_sh)
o_sh = torch.optim.Adam(fresh_sh.parameters(), 1e-2)
assert checkpoint.load_checkpoint(run, {}, {"g": (fresh_sh, o_sh)}) == 3
o_plain = torch.optim.Adam(fresh_plain.parameters(), 1e-2)
checkpoint.load_checkpoint(run, {"student": fresh_plain}, {"g": (fresh_plain, o_plain)})
step(ref, opt_ref); step(fresh_sh, o_sh); step(fresh_plain, o_plain)
close(full(fresh_sh), full(ref))
close(full(fresh_plain), full(ref))
(run / f"ok{rank}").write_text("ok")  # a file per rank: two processes' prints can interleave
finish(0)  # exit before interpreter teardown: gloo can abort there (pytorch/pytorch#190489)
'''


@pytest.mark.slow
def test_fsdp2_shards_gather_for_ema_and_checkpoints(tmp_path):
    """FSDP2 (fully_shard) on 2 CPU processes: the EMA and the checkpoint see whole parameters, and a checkpoint
    resumes into a sharded or an unsharded model, continuing exactly as an uninterrupted run."""
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29531", str(tmp_path / "worker.py"), str(tmp_path / "run")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "run" / "ok0").is_file() and (tmp_path / "run" / "ok1").is_file()


Z2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}


@pytest.mark.parametrize("kind,fsdp2,lora,ds,cfg,message", [
    ("DEEPSPEED", False, 0, {"zero_optimization": {"stage": 3}}, {}, "ZeRO-3 is not supported"),
    ("DEEPSPEED", False, 0, Z2, {"mixed_precision": "bf16"}, "mixed_precision"),
    ("DEEPSPEED", False, 0, {**Z2, "fp16": {"enabled": True}}, {}, "mixed_precision"),
    ("DEEPSPEED", False, 0, {**Z2, "optimizer": {"type": "Adam"}}, {}, "optimizer or scheduler"),
    ("DEEPSPEED", False, 0, Z2, {"optimizer": "adam8bit"}, "optimizer=adam"),
    ("DEEPSPEED", False, 0, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, {},
     "offload"),
    ("DEEPSPEED", False, 4, Z2, {}, None),
    ("FSDP", False, 0, {}, {}, "FSDP1 is not supported"),
    ("FSDP", True, 4, {}, {}, "LoRA student"),
    ("FSDP", True, 0, {}, {}, None),
    ("MULTI_GPU", False, 4, {}, {}, None),
])
def test_backend_check(kind, fsdp2, lora, ds, cfg, message):
    """DDP, FSDP2 and DeepSpeed ZeRO-1/2 (fp32, our optimisers) run; anything else stops with one line."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from imagine_flash.config import ConfigError, DistillConfig
    from imagine_flash.backend import check_backend

    acc = SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=fsdp2,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    cfg = DistillConfig(lora_rank=lora, **cfg)
    if message is None:
        check_backend(acc, cfg)
    else:
        with pytest.raises(ConfigError, match=message) as e:
            check_backend(acc, cfg)
        assert "\n" not in str(e.value)


DS_WORKER = r'''
import json, os, sys
from safetensors.torch import save_file
from accelerate.state import PartialState
if "--cpu-world" in sys.argv:  # accelerate gives DeepSpeed on CPU no backend (world 1): give it gloo, as on GPUs nccl
    from accelerate.utils import DistributedType
    real_prepare_backend = PartialState._prepare_backend
    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        b, t = real_prepare_backend(self, cpu, sagemaker_dp, backend)
        return ("gloo", DistributedType.MULTI_CPU) if b is None and "LOCAL_RANK" in os.environ else (b, t)
    PartialState._prepare_backend = prepare_backend
if "--fsdp-cpu" in sys.argv:  # accelerate enables FSDP on GPUs only: enable it on CPU (gloo) too, nothing else
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    real_state_init = AcceleratorState.__init__
    def state_init(self, *a, **k):
        real_state_init(self, *a, **k)
        if self.distributed_type == DistributedType.MULTI_CPU and k.get("fsdp_plugin") is not None:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, k["fsdp_plugin"]
    AcceleratorState.__init__ = state_init
from imagine_flash import backend, train
from imagine_flash.config import DistillConfig

seen = {"engines": set()}
real_ema_update, real_is_engine = train.ema_update, backend._is_engine
def record(ema, net, decay):
    seen["student"] = net
    real_ema_update(ema, net, decay)
def is_engine(model):
    seen["engines"].add(bool(real_is_engine(model)))
    return real_is_engine(model)
train.ema_update, backend._is_engine = record, is_engine
out, teacher, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = DistillConfig(out=out, teacher=teacher, batch_size=4, grad_accum=2, k=2, max_steps=steps, ckpt_every=2,
                    sample_every=100, log_every=1, eval_samples=0, adv_weight=0.1, threads=1,
                    teacher_dtype="fp32")  # auto is bf16 on CPUs with native bf16: its rounding depends on batch shape
train.distill(cfg, resume="--resume" in sys.argv)
rank = PartialState().process_index
from imagine_flash.dist import full_state_dict  # a collective when sharded
from torch.distributed.tensor import DTensor
weights = full_state_dict(seen["student"])
save_file(weights, f"{out}/final{rank}.safetensors")
open(f"{out}/sharded{rank}.json", "w").write(json.dumps(all(isinstance(p, DTensor) for p in seen["student"].parameters())))
open(f"{out}/engines{rank}.json", "w").write(json.dumps(sorted(seen["engines"])))
from imagine_flash.backend import finish
finish(0)  # exit before interpreter teardown: gloo can abort there (pytorch/pytorch#190489)
'''


def _start(cmd, tmp_path, name, teacher, steps, *extra):
    """Start one DS_WORKER run (plain Python or an accelerate launch) into tmp_path/name, its output in a log file."""
    (tmp_path / "worker.py").write_text(DS_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = cmd + [str(tmp_path / "worker.py"), str(tmp_path / name), str(teacher), str(steps), *extra]
    return (*_spawn(argv, env, tmp_path / f"{name}-{steps}.log"), tmp_path / name)


def _together(*jobs):
    """Wait for runs started with _start (independent ones run side by side: each process has one thread); each must
    exit 0. Returns their folders."""
    for proc, log, _ in jobs:
        _output(proc, log)
    return [path for _, _, path in jobs]


def _launch(cmd, tmp_path, name, teacher, steps, *extra):
    """One DS_WORKER run into tmp_path/name; it must exit 0."""
    return _together(_start(cmd, tmp_path, name, teacher, steps, *extra))[0]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_teacher):
    """The one-process reference (no DeepSpeed, no FSDP) of DS_WORKER's config, 4 updates: both backend tests compare
    with it, so it is trained once for the module."""
    return _launch([sys.executable], tmp_path_factory.mktemp("plain"), "plain", tiny_teacher, 4)


@needs_data
@pytest.mark.slow
def test_deepspeed_zero2_equals_plain_and_resumes_exactly(tmp_path, tiny_teacher, plain_run):
    """configs/accelerate/deepspeed_zero2.yaml, one CPU process (accelerate runs DeepSpeed on CPU as one process):
    the student and the discriminator each train in a ZeRO-2 engine, with 2 accumulated micro-batches, and
    - the weights equal a plain run's, up to float rounding (same batches, same clipping, same Adam);
    - the checkpoint's optimiser state has the plain run's format and values (name-keyed, gathered);
    - a run killed at step 2 and resumed ends bitwise equal to the uninterrupted run.
    Then 2 processes (accelerate's CPU backend patched in the worker only): ZeRO-2 partitions the Adam state across
    them, the replicas stay bitwise identical, and weights and gathered optimiser state equal the one-process run's."""
    pytest.importorskip("deepspeed")
    import json

    ds = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
          "--main_process_port", "29523"]
    ds2 = [*ds[:-3], "2", "--main_process_port", "29524"]
    runs = {"plain": plain_run}
    runs["ds"], _ = _together(_start(ds, tmp_path, "ds", tiny_teacher, 4),  # one process each: side by side
                              _start(ds[:-1] + ["29525"], tmp_path, "res", tiny_teacher, 2))
    runs["res"], runs["two"] = _together(_start(ds, tmp_path, "res", tiny_teacher, 4, "--resume"),
                                         _start(ds2, tmp_path, "two", tiny_teacher, 4, "--cpu-world"))
    for name, run in runs.items():
        for rank in range(2 if name == "two" else 1):
            engines = json.loads((run / f"engines{rank}.json").read_text())
            assert engines == ([False] if name == "plain" else [True])
    plain, dsw, res, two0, two1 = (load_file(runs[n] / f"final{r}.safetensors")
                                   for n, r in (("plain", 0), ("ds", 0), ("res", 0), ("two", 0), ("two", 1)))
    init = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(plain[k], init[k].float()) for k in plain)  # training moved the weights
    for k in plain:
        torch.testing.assert_close(dsw[k], plain[k], rtol=1e-4, atol=2e-6)
        assert torch.equal(res[k], dsw[k]), k
        assert torch.equal(two0[k], two1[k]), k
        torch.testing.assert_close(two0[k], plain[k], rtol=1e-4, atol=2e-5)  # other reductions
    sp = torch.load(latest(plain_run) / "state.pt", weights_only=True)["opts"]
    for run in ("ds", "two"):
        sd = torch.load(latest(runs[run]) / "state.pt", weights_only=True)["opts"]
        for o in ("g", "d"):
            assert sd[o]["param_groups"] == sp[o]["param_groups"]
            assert sd[o]["state"].keys() == sp[o]["state"].keys()
            for n, st in sp[o]["state"].items():
                assert sd[o]["state"][n].keys() == st.keys()
                for key, v in st.items():
                    torch.testing.assert_close(sd[o]["state"][n][key], v, rtol=1e-3, atol=1e-4 * float(v.abs().max()))


@needs_data
@pytest.mark.slow
def test_accelerate_fsdp2_launch_equals_one_process_and_resumes(tmp_path, tiny_teacher, plain_run):
    """`accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2`, the real distill loop with
    accelerate's own FSDP2 wrapping (accelerate enables FSDP on GPUs only, so the worker switches it on for CPU/gloo):
    every student parameter is sharded, the gathered weights and Adam state equal a one-process run's, and a run
    killed at step 2 and resumed ends bitwise equal to the uninterrupted one. Each process draws its own step
    indices, so this also checks that the processes' rollouts make the same forward calls (FSDP all-gathers in each)."""
    import json

    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port"]
    _together(_start(fsdp + ["29526"], tmp_path, "fsdp", tiny_teacher, 4, "--fsdp-cpu"),
              _start(fsdp + ["29527"], tmp_path, "res", tiny_teacher, 2, "--fsdp-cpu"))
    _launch(fsdp + ["29528"], tmp_path, "res", tiny_teacher, 4, "--fsdp-cpu", "--resume")
    for rank in (0, 1):
        assert json.loads((tmp_path / "fsdp" / f"sharded{rank}.json").read_text()) is True
    plain = load_file(plain_run / "final0.safetensors")
    f0, f1, res = (load_file(tmp_path / n / f"final{r}.safetensors") for n, r in (("fsdp", 0), ("fsdp", 1), ("res", 0)))
    for k in plain:
        assert torch.equal(f0[k], f1[k]), k
        torch.testing.assert_close(f0[k], plain[k], rtol=1e-4, atol=2e-5)
        assert torch.equal(res[k], f0[k]), k
    sp, sf = (torch.load(latest(p) / "state.pt", weights_only=True)["opts"] for p in (plain_run, tmp_path / "fsdp"))
    for o in ("g", "d"):
        assert sf[o]["state"].keys() == sp[o]["state"].keys()
        for n, st in sp[o]["state"].items():
            for key, v in st.items():
                torch.testing.assert_close(sf[o]["state"][n][key], v, rtol=1e-3, atol=1e-4 * float(v.abs().max()))
