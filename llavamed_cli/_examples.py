"""One or two examples at the end of every command's ``--help`` (Typer's ``epilog``).

Kept in one table so that they stay consistent; :func:`add_examples` attaches them to the
commands of the root app (a command that sets its own epilog keeps it). A test checks that every
command has one.
"""

from __future__ import annotations

from typing import Any

CPU_SMOKE = ("On a CPU with the tiny preset the paper's recipe (lr 2e-5) learns nothing in a few hundred "
             "steps; for a smoke run use --lr 1e-3 (align) or 2e-3 (instruct) and --global-batch 32, "
             "as `llavamed demo` does.")

EXAMPLES: dict[str, list[str]] = {
    "chat": ["llavamed chat scan.png --model ckpt/llava-med-v1.5 --prompt \"Is there a pneumothorax?\"",
             "llavamed chat --model ckpt/llava-med-v1.5    (a conversation; /help lists its commands)"],
    "demo": ["llavamed demo --out llavamed-demo", "llavamed demo --quick --out /tmp/demo --overwrite"],
    "serve": ["llavamed serve --model ckpt/llava-med-v1.5 --port 8000    (web page at http://127.0.0.1:8000/)",
              "llavamed serve --model ckpt/llava-med-v1.5 --host 0.0.0.0 --api-key \"$KEY\""],
    "data synth": ["llavamed data synth --out data/synth"],
    "data validate": ["llavamed data validate data/vqa-rad/train.json --images data/vqa-rad/images"],
    "data download": ["llavamed data download instruct eval --dest data/llava-med",
                      "llavamed data download --verify --dest data/llava-med"],
    "data extract": ["llavamed data extract --urls llava_med_image_urls.jsonl --out data/images "
                     "--only llava_med_instruct_60k_inline_mention.json"],
    "data prepare": ["llavamed data prepare vqa-rad --src raw/vqa-rad --out data/vqa-rad"],
    "data view": ["llavamed data view scan.dcm --out view.png --window lung"],
    "weights init": ["llavamed weights init --preset tiny --out ckpt/tiny",
                     "llavamed weights init --llm mistralai/Mistral-7B-Instruct-v0.2 "
                     "--vision openai/clip-vit-large-patch14-336 --out ckpt/init"],
    "weights apply-delta": ["llavamed weights apply-delta --base llama-7b --delta llava-med-7b-delta --out ckpt/llava-med-7b"],
    "weights make-delta": ["llavamed weights make-delta --base llama-7b --target ckpt/llava-med-7b --out delta/"],
    "weights convert": ["llavamed weights convert microsoft/llava-med-v1.5-mistral-7b --out ckpt/llava-med-v1.5"],
    "weights merge-lora": ["llavamed weights merge-lora --adapter ckpt/lora --out ckpt/merged"],
    "eval vqa": ["llavamed eval vqa --model ckpt/llava-med-v1.5 --dataset vqa-rad --out eval/vqa-rad",
                 "llavamed eval vqa --answers answers.jsonl --gt data/vqa-rad/test.json"],
    "eval gpt-score": ["llavamed eval gpt-score --questions llava_med_eval_qa50_qa.jsonl --answers answers.jsonl "
                       "--output reviews.jsonl"],
    "eval summarize": ["llavamed eval summarize eval/before eval/after --plot compare.png",
                       "llavamed eval summarize reviews_a.jsonl reviews_b.jsonl --format markdown"],
    "train align": ["llavamed train align --model ckpt/init --data align.json --images images --out ckpt/align",
                    "llavamed train align --model ckpt/tiny --data synth/align.json --images synth/images "
                    "--out ckpt/align --lr 1e-3 --global-batch 32    (CPU smoke run)"],
    "train instruct": ["llavamed train instruct --model ckpt/align --data instruct.json --images images "
                       "--out ckpt/instruct --gpus 8 --deepspeed zero3",
                       "llavamed train instruct --model ckpt/align --data synth/train.json --images synth/images "
                       "--out ckpt/instruct --lr 2e-3 --global-batch 32    (CPU smoke run)"],
    "train finetune": ["llavamed train finetune --model ckpt/instruct --data data/vqa-rad/train.json "
                       "--images data/vqa-rad/images --out ckpt/vqa-rad --lora"],
    "instruct gen": ["llavamed instruct gen --input llava_med_instruct_fig_captions.json --output gen.jsonl "
                     "--model gpt-4o-mini"],
    "instruct post": ["llavamed instruct post --input gen.jsonl --output llava_med_instruct.json --seed 0"],
    "config show": ["llavamed config show"],
    "config set": ["llavamed config set model ckpt/llava-med-v1.5"],
}

TRAIN_NOTES = {"train align": CPU_SMOKE, "train instruct": CPU_SMOKE}


def epilog(path: str) -> str | None:
    """The epilog of command ``path`` (``"train instruct"``), or ``None``."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    # Rich help keeps the lines apart when they are separate paragraphs.
    text = "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)
    if path in TRAIN_NOTES:
        text += "\n\n" + TRAIN_NOTES[path]
    return text


def add_examples(app: Any, prefix: str = "") -> None:
    """Attach :func:`epilog` to every command of ``app`` and its sub-apps that has none."""
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__.replace("_", "-")
        if cmd.epilog is None:
            cmd.epilog = epilog(f"{prefix}{name}")
    for group in app.registered_groups:
        add_examples(group.typer_instance, f"{prefix}{group.name} ")
