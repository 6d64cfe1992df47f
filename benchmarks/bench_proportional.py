"""Cost of proportional attention (log(size) bias on merged tokens) in prefill at LLaVA-OV-0.5B LM dims.

Run by hand; ~2 minutes. The bias needs a materialised float mask, which takes SDPA off its
mask-free causal path: this measures what that costs, interleaved, in one process.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from streamprune.models.inner_stage import InnerStage
from streamprune.reduce.inner_cuts import InnerConfig

LENGTHS = (703, 1644)  # retain 0.1 and 0.25 of 32×196 tokens, + prompt text


@torch.no_grad()
def prefill(model, embeds, stage: InnerStage | None) -> float:
    t0 = time.perf_counter()
    if stage is None:
        model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    else:
        with stage.installed():
            model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(2)
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    results = {}
    for n in LENGTHS:
        embeds = torch.randn(1, n, 896) * 0.02
        visual = torch.zeros(1, n, dtype=torch.bool)
        visual[0, 14:n - 60] = True
        sizes = torch.ones(1, n)
        sizes[visual] = torch.randint(1, 20, (int(visual.sum()),)).float()
        stages = {"plain": None}
        for name, cfg in {"proportional": InnerConfig(mode="holitom", ratio=0.0, proportional=True),
                          "inner 0.5": InnerConfig(mode="holitom", ratio=0.5),
                          "inner 0.5 + proportional": InnerConfig(mode="holitom", ratio=0.5, proportional=True)}.items():
            stages[name] = InnerStage(model.model, cfg)
            stages[name].prepare(visual, sizes)
        times = {k: [] for k in stages}
        prefill(model, embeds, None)  # warm-up
        for rep in range(3):
            for name in (list(stages) if rep % 2 == 0 else list(reversed(stages))):
                times[name].append(prefill(model, embeds, stages[name]))
        base = statistics.median(times["plain"])
        results[n] = {k: {"prefill_s": round(statistics.median(v), 3), "vs_plain": round(statistics.median(v) / base, 3)}
                      for k, v in times.items()}
        print(n, json.dumps(results[n]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
