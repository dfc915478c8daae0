"""Render docs/teacher_grid.png: the shipped teacher, 25 DPM-Solver++ steps with its CFG, one image per
(class, colour) pair: rows are the 10 classes, columns the 8 colours, seed = the cell index."""
import sys

import torch

from imagine_flash.data.fashion import COLORS
from imagine_flash.generate import ModelRunner
from imagine_flash.pretrain import grid_prompts
from imagine_flash.viz import grid_image, save_png

out = sys.argv[1] if len(sys.argv) > 1 else "docs/teacher_grid.png"
runner = ModelRunner(sys.argv[2] if len(sys.argv) > 2 else None)
prompts = grid_prompts()
images, _ = runner.sample(prompts, list(range(len(prompts))), steps=25)
save_png(grid_image(images, ncol=len(COLORS), scale=4), out)
print(f"wrote {out}")
