"""LoRA aggregation schemes on the default task: naive, FFA-LoRA, FedEx-LoRA, FlexLoRA, at one rank and mixed.

    python experiments/study_lora_schemes.py                      # 3 seeds, the committed table + plot
    python experiments/study_lora_schemes.py --smoke --out /tmp/l # 1 seed, 2 rounds

Every arm is the default experiment (all-MiniLM-L6-v2 + LoRA on query/value, 3 clouds x 3 clients,
Dirichlet 0.5 topics, AdamW lr 1e-2, 2 local steps of 8): only model.lora.aggregation and
model.lora.client_ranks change. "mixed" arms give the clients ranks 2, 4 and 8 in turn (padded width 8),
as clouds with different hardware would. Scored like study_pretrained.py (same eval set, accuracy and
macro-F1); writes OUT/results.json, and through the report code OUT/table.md, table.csv and accuracy.png
(`--render` rewrites those three from OUT/results.json without running anything).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study_pretrained import main  # noqa: E402

MIXED = "model.lora.client_ranks=[2,4,8]"
ARMS = {
    "naive": ["model.lora.aggregation=naive"],
    "ffa": ["model.lora.aggregation=ffa"],
    "fedex": ["model.lora.aggregation=fedex"],
    "flex": ["model.lora.aggregation=flex"],
    "naive-mixed": ["model.lora.aggregation=naive", MIXED],
    "ffa-mixed": ["model.lora.aggregation=ffa", MIXED],
    "fedex-mixed": ["model.lora.aggregation=fedex", MIXED],
    "flex-mixed": ["model.lora.aggregation=flex", MIXED],
}

if __name__ == "__main__":
    main(ARMS, out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lora_schemes"),
         doc=__doc__, title="LoRA aggregation schemes (MiniLM, topics)")
