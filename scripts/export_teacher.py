"""Export a pretrain run's weights as the shipped teacher folder (fp16 safetensors, loaded back as fp32).

usage: python scripts/export_teacher.py RUN_DIR OUT_DIR [ema|live]
"""
import json
import sys

from safetensors.torch import load_file

from imagine_flash.checkpoint import latest
from imagine_flash.models import load_model_folder, save_model_folder

run, out, which = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "ema")
unet, sched_cfg, meta = load_model_folder(f"{run}/model")
unet.load_state_dict(load_file(latest(run) / f"{'ema' if which == 'ema' else 'unet'}.safetensors"))

save_model_folder(out, unet.half(), sched_cfg, {**meta, "weights": which})
print(f"exported {which} weights of {run} to {out}")
