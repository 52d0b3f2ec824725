#!/bin/bash
# The Shapes recipe sweep on the device machine (see tools/shapes_recipe_sweep.py). Wheels the machine lacks
# (diffusers, pycocotools, open_clip_torch for the CLIP BPE file) are carried in .whl/ (ignored by git).
# Usage there: bash tools/shapes_recipe_sweep.sh        (writes $OUT/sweep.json, $OUT/grids.tar)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OUT=${OUT:-outputs/recipe_sweep}  # the device tool sets OUT; elsewhere results stay beside the work folder
W=${SWEEP_DIR:-outputs/recipe_sweep}  # work folder, relative to the repository root (outputs/ is ignored)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" \
  .whl/diffusers-*.whl .whl/pycocotools-*.whl .whl/open_clip*.whl || exit 3
export PYTHONPATH="$PWD/$W/site:$PWD"
mkdir -p "$W/logs"
python3 tools/shapes_recipe_sweep.py prep $W 5000 || exit 4
for v in ${VARIANTS:-base coord coord_lr2 coord_ema995 coord_attn16 coord_nodrop coord_long base_long}; do
  python3 tools/shapes_recipe_sweep.py train $W $v cuda > $W/logs/train_$v.log 2>&1 &
done
wait
python3 -c "
import glob, json, sys
json.dump([json.load(open(p)) for p in sorted(glob.glob('$W/*/proxy.json'))], open('$OUT/sweep.json', 'w'), indent=1)"
(cd $W && tar cf $OUT/grids.tar logs */grid.png */loss.csv */summary.json)
