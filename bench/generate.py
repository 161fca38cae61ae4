"""Generation: one prompt at a time (the blog post's way) vs ``generate_texts`` batching 16 prompts.

16 prompts from WikiText-2 (their first 4 to 19 words, so the batch needs left padding), 64 new tokens, greedy
and top-p (0.92), a random 4-layer, 256-wide GPT-2 with the real GPT-2 tokenizer, CPU. Both sides run in this
process, interleaved and repeated; the greedy continuations must be identical.

    python bench/generate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402

GOAL_SPEEDUP = 4.0
NEW_TOKENS = 16 * 4  # 64


def wikitext_prompts(n: int = 16) -> list[str]:
    """The first words (4 to 19 of them, varying) of the first ``n`` paragraphs of the validation file."""
    import pandas as pd

    texts = pd.read_parquet(common.WIKITEXT_FILES["validation"])["text"]
    paragraphs = [t.strip() for t in texts if len(t.split()) > 20 and not t.strip().startswith("=")]
    return [" ".join(p.split()[: 4 + (i * 5) % 16]) for i, p in enumerate(paragraphs[:n])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: one per core)")
    args = parser.parse_args()
    common.require_shared_data()
    common.set_threads(args.threads)
    import torch

    from bench import reference
    from lm_lightning import PRESETS, generate_texts, load_tokenizer

    tokenizer = load_tokenizer(common.GPT2_TOKENIZER)
    model = common.small_gpt2().eval()
    prompts = wikitext_prompts()
    decodings = {
        "greedy": dataclasses.replace(PRESETS["greedy"], max_new_tokens=NEW_TOKENS),
        "top_p": dataclasses.replace(PRESETS["top_p"], max_new_tokens=NEW_TOKENS),
    }

    def run_reference(decoding) -> tuple[list[str], int]:
        kwargs = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.do_sample}
        if decoding.do_sample:
            torch.manual_seed(decoding.seed)
            kwargs.update(top_p=decoding.top_p, top_k=decoding.top_k)
        out = reference.generate_one_at_a_time(model, tokenizer, prompts, **kwargs)
        return [text for text, _ in out], sum(n for _, n in out)

    def run_ours(decoding) -> tuple[list[str], int]:
        out = generate_texts(model, tokenizer, prompts, decoding, batch_size=16)
        return [g.text for g in out], sum(g.num_new_tokens for g in out)

    rows, figures, verdicts, loads = [], [], [], []
    for name, decoding in decodings.items():
        sides = {"one at a time": run_reference, "batched (16)": run_ours}
        times: dict[str, list[float]] = {side: [] for side in sides}
        outputs, tokens = {}, {}
        for _ in range(args.repeats):
            for side, fn in sides.items():
                (outputs[side], tokens[side]), seconds = common.timed(lambda fn=fn, d=decoding: fn(d))
                times[side].append(seconds)
            loads.append(common.load_average())
        rate = {side: tokens[side] / common.median(t) for side, t in times.items()}
        speedup = rate["batched (16)"] / rate["one at a time"]
        same = outputs["one at a time"] == outputs["batched (16)"]
        for side, t in times.items():
            rows.append(
                [
                    name,
                    side,
                    f"{common.median(t):.2f}",
                    f"{rate[side]:.0f}",
                    same if name == "greedy" else "-",
                ]
            )
        figures.append(
            f"{name}: one at a time {rate['one at a time']:.0f} tok/s, "
            f"batched {rate['batched (16)']:.0f} tok/s ({speedup:.2f}x)"
            + (f", outputs identical: {same}" if name == "greedy" else "")
        )
        goal = (
            f"{name} {speedup:.2f}x (goal >= {GOAL_SPEEDUP:.0f}x: {common.verdict(speedup >= GOAL_SPEEDUP)})"
        )
        if name == "greedy":
            goal += f"; greedy outputs identical: {common.verdict(same)}"
        verdicts.append(goal)
    common.print_table(["decoding", "side", "median s", "new tok/s", "same text"], rows)
    setting = f"16 prompts x {NEW_TOKENS} new tokens, 4x256 GPT-2, {args.threads or 'all'} torch thread(s): "
    figures_text = setting + "; ".join(figures)
    print(f"{figures_text}\n  -> {'; '.join(verdicts)}")
    common.append_row("generate", figures_text, "; ".join(verdicts), " ".join(loads))


if __name__ == "__main__":
    main()
