"""Run timm's train.py with the `vpt_<name>` models registered (vpt_fast.register_timm()).

timm's train.py ships with the pytorch-image-models repository, not with the timm package, so give
its path first; everything after it goes to train.py unchanged:

    python examples/timm_train.py pytorch-image-models/train.py --model vpt_vit_base_patch16_224 \
        --pretrained --num-classes 100 --model-kwargs num_prompts=50 deep=True --data-dir /data/...
    torchrun --nproc_per_node=8 examples/timm_train.py pytorch-image-models/train.py ...
"""
import runpy
import sys

import vpt_fast

if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit(f"usage: {sys.argv[0]} PATH/TO/train.py [train.py arguments]")
    vpt_fast.register_timm()
    sys.argv = sys.argv[1:]  # train.py sees itself as argv[0]
    runpy.run_path(sys.argv[0], run_name="__main__")
