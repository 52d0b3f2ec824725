#!/bin/bash
# `instdiff bench --protocol` on a lent GPU machine that has torch but no network: the report's other packages
# (diffusers, transformers, tokenizers, pycocotools, open_clip's BPE vocabulary) travel as wheels in .whl/
# (see ../.library/device/README.md). Writes protocol.json and protocol.log under $OUT.
set -o pipefail
SITE=$(mktemp -d)  # the wheels' install target, outside the checkout
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python3 -m instdiff_lib.cli bench --protocol --device cuda --dtype fp16 --budget "${BUDGET:-300}" \
  --out "$OUT/protocol.json" 2>&1 | tee "$OUT/protocol.log"
