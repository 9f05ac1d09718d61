#!/usr/bin/env bash
# The preconditioned CounterFact MEND editor of the README ("Training MEND on CounterFact"): the commands as they
# were run on the 2-core CPU (one session each time: stopped and resumed twice, so the cosine restarted twice),
# then the comparison with ROME on 200 counterfact-val records. About 20 + 25 + 85 minutes of training (1.25-1.6
# steps/s) and 20 minutes of evaluation; on a GPU add trainer.accelerator=auto to TRAIN.
#
#   bash bench/train_counterfact_pre.sh [OUT]      (OUT: checkpoints/mend-smollm2-135m-counterfact-pre)
#
# Every locality row of configs/train/counterfact.yaml is on from step 0 (the edit, its paraphrase, its neighbour
# prompt, two prompts of other records with the same relation, one row of WikiText-validation text) and the
# preconditioner P is fitted once before step 0 (hypernet.precondition, in the config).
# 1. steps 0-1,500 of a cosine over 5,000 steps (stopped for time);
# 2. resumed to 3,500 with the cosine ending there (validation edit_success 0.75 / locality 0.93);
# 3. resumed to 11,500 with the cosine over 11,500 (the rate jumps back to 80% of its peak at step 3,500).
# <out>/best keeps the editor of the best validation score (64 counterfact-val records): step 10,500.
set -euo pipefail
OUT=${1:-checkpoints/mend-smollm2-135m-counterfact-pre}
PY=${PY:-python}
TRAIN=(-m mend.train configs/train/counterfact.yaml eval.enabled=false "out=$OUT")

"$PY" "${TRAIN[@]}" trainer.max_steps=1500 optim.schedule_steps=5000
"$PY" "${TRAIN[@]}" trainer.max_steps=3500 optim.schedule_steps=3500
"$PY" "${TRAIN[@]}" trainer.max_steps=11500 optim.schedule_steps=11500

"$PY" -m mend.evaluate editors=[mend,rome] "editor.checkpoint=$OUT/best" data=counterfact \
    "data.path=${MEND_DATA_DIR:-../shared/data}/counterfact/counterfact-val.json" data.limit=200 \
    out=runs/mend-pre-vs-rome-cf200
