"""Write the quality sections of BENCHMARKS.md from the experiment folders.

    python experiments/write_benchmarks.py

Replaces the blocks between ``<!-- quality:<name>:begin -->`` and
``<!-- quality:<name>:end -->`` (adding them after the title if missing) with the
current tables of ``experiments/results/<name>/``, so the numbers always match the
committed results files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K_ROWS = (
    "lora_trunc_paper",
    "lora_svd",
    "lora_select",
    "lora_per_rank",
    "dylora",
    "matryoshka_trained",
    "matryoshka_svd",
    "matryoshka_select",
    "mat_prefix_trained",
    "mat_prefix_svd",
    "mat_prefix_select",
    "mat_prefix1_trained",
    "mat_prefix1_svd",
    "mat_prefix1_select",
)
RESULTS = ROOT / "experiments" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- quality:{name}:begin -->", f"<!-- quality:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    anchor = "## Speed and memory"
    return (
        text.replace(anchor, block + "\n\n" + anchor, 1)
        if anchor in text
        else text + "\n" + block + "\n"
    )


def comparison_block(folder: Path, heading: str, command: str) -> str:
    spec = json.loads((folder / "spec.json").read_text())
    runs = [
        json.loads(line)
        for line in (folder / "runs.jsonl").read_text().splitlines()
        if line.strip()
    ]
    runs = list({r["name"]: r for r in runs}.values())  # later lines complete earlier ones
    seeds = sorted({r["key"]["seed"] for r in runs})
    what = (
        f"{spec['num_labels']}-class accuracy (%) on the test split"
        if spec.get("task") == "seq-cls"
        else f"teacher-forced {spec['metric']} (%) on the test split"
    )
    lines = [
        f"### {heading}",
        "",
        f"- Command: `{command}` (resumable: the same command continues an interrupted comparison)",
        f"- Setup: {spec['model']} on `{spec['dataset']}` ({spec.get('task', 'sft')}), R = {spec['max_rank']}, "
        f"ranks {spec['ranks']}, {spec['scaling']} scaling, targets {', '.join(spec['target_modules'])}; "
        f"{spec['steps']} steps x {spec['batch_size']} examples (<= {spec['max_length']} tokens), "
        f"{spec['val_size']} validation / {spec['test_size']} test examples; metric: {what}.",
        f"- Learning-rate grids: {json.dumps(spec['learning_rates'])}; seeds planned {spec['seeds']}, "
        f"seeds finished so far {seeds}; {len(runs)} training runs done.",
        "",
        (folder / "results.md").read_text().strip(),
        "",
    ]
    for stem, caption in (("rank_curves", "the methods"), ("rank_curves_variants", "the variants")):
        if (folder / f"{stem}.png").exists():
            lines += [
                "",
                f"![rank curves: {caption}]({(folder / f'{stem}.png').relative_to(ROOT).as_posix()})",
            ]
    return "\n".join(lines)


GSM8K_COMMAND = (
    "python experiments/compare.py --output experiments/results/smollm2-gsm8k "
    "--dataset ../shared/data/gsm8k --rows "
    + ",".join(GSM8K_ROWS)
    + " --lr matryoshka=8e-3,2e-3,1.6e-2 "
    "--lr lora=8e-3,2e-3,2e-2 --lr dylora=8e-3,2e-3,2e-2 --lr lora_r=2e-3 --lr lora_r:1=2e-3 "
    "--lr mat_prefix=2e-3,8e-3 --lr mat_prefix1=2e-3,8e-3 --threads 1"
)


def main() -> None:
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    comparisons = {  # results folder (and notes-<name>.md) -> heading, command
        "smollm2-facts": (
            "Where capacity binds: SmolLM2-135M-Instruct recalling invented facts, q_proj and "
            "v_proj, ranks 1..16",
            "bash experiments/facts_150.sh A; then grid; then screen; then grid2; "
            "then seed 1 & seed 2; then rest 1 & rest 2",
        ),
        "smollm2-gsm-symbolic-150": (
            "Quality where rank matters: SmolLM2-135M-Instruct + GSM-Symbolic, 150 steps, ranks 1..16",
            "bash experiments/gsm_symbolic_150.sh A & bash experiments/gsm_symbolic_150.sh B; "
            "then seed 1 & seed 2; then grid & screen; then rest & screen",
        ),
        "smollm2-gsm8k-150": (
            "Quality where rank matters, second task: SmolLM2-135M-Instruct + GSM8K, 150 steps, ranks 1..16",
            "bash experiments/gsm8k_150.sh A & bash experiments/gsm8k_150.sh B; "
            "then grid; then seed 1 & seed 2",
        ),
        "smollm2-gsm-symbolic": (
            "Quality: every method on SmolLM2-135M-Instruct + GSM-Symbolic, ranks 1..16",
            "python experiments/compare.py --output experiments/results/smollm2-gsm-symbolic --threads 1",
        ),
        "smollm2-gsm8k": (
            "Quality, second task: SmolLM2-135M-Instruct on the real GSM8K, ranks 1..16",
            GSM8K_COMMAND,
        ),
    }
    for name, (heading, command) in comparisons.items():
        folder = RESULTS / name
        if not (folder / "runs.jsonl").exists():
            continue
        body = comparison_block(folder, heading, command)
        notes = ROOT / "experiments" / f"notes-{name}.md"
        if notes.exists():
            body += "\n\n" + notes.read_text().strip()
        text = replace_block(text, name, body)
    budgets = {  # results folder (and notes-<name>.md) -> heading, what the adapter is
        "budget-smollm2": (
            "Per-module rank budgets vs a uniform rank (SmolLM2, trained Matryoshka adapter)",
            "the MatryoshkaLoRA run of the 40-step comparison (R = 16, lr 2e-3, seed 0)",
        ),
        "budget-smollm2-150": (
            "Per-module rank budgets vs a uniform rank where rank matters (SmolLM2, LoRA + SVD, 150 steps)",
            "the 150-step GSM-Symbolic LoRA (R = 16, lr 4e-3, seed 0), re-based on the SVD "
            "of each update (`--rebase`)",
        ),
    }
    for name, (heading, adapter) in budgets.items():
        folder = RESULTS / name
        if not (folder / "budget.md").exists():
            continue
        args = json.loads((folder / "budget.json").read_text())["args"]
        rebase = " --rebase" if args.get("rebase") else ""
        command = (
            f"python experiments/budget.py --adapter {args['adapter']} --output {args['output']} "
            f"--size {args['size']} --max-length {args['max_length']}{rebase}"
        )
        body = "\n".join(
            [
                f"### {heading}",
                "",
                f"- Command: `{command}`",
                f"- Adapter: {adapter}, deployed with the `{args['inference_scale']}` scale; "
                f"{args['size']} held-out GSM-Symbolic problems (seed {args['data_seed']}, <= "
                f"{args['max_length']} tokens), teacher-forced token accuracy and loss. Each budget "
                "is the parameter count of a uniform rank; the allocations never exceed it.",
                "",
                (folder / "budget.md").read_text().strip(),
            ]
        )
        notes = ROOT / "experiments" / f"notes-{name}.md"
        if notes.exists():
            body += "\n\n" + notes.read_text().strip()
        text = replace_block(text, name, body)
    BENCHMARKS.write_text(text)
    print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
