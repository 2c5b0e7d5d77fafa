"""Questions per second of ``eval vqa`` (batched engine) vs one question at a time with plain ``generate``.

The baseline is what the original LLaVA-Med scripts did: for each question, render the prompt,
run ``model.generate`` alone, decode. The contender is llavamed's answer generation
(:func:`llavamed_core.eval.answers.answer_questions`: length-sorted, left-padded batches through
the engine), on the same model, the same questions and the same greedy settings, in one run.
It also checks that both give the same answers.

Run::

    python benchmarks/eval_throughput.py                       # CPU, tiny model, batch 16
    python benchmarks/eval_throughput.py --device cuda --size 0.5b   # one GPU, ~0.5B model in bf16

``--size 0.5b`` is the ``llava-med-v1.5`` preset (Mistral-7B width, CLIP ViT-L/14-336, 576 image
tokens) cut to 2 text layers and 12 vision layers, randomly initialised: the per-token work of a
real model's layers at a fraction of the load time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _build(size: str, device: str):
    import torch

    from llavamed_core.model import build_from_preset

    if size == "tiny":
        model, processor = build_from_preset("tiny", seed=0)
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, processor = build_from_preset("llava-med-v1.5", seed=0, dtype=dtype,
                                             text_overrides={"num_hidden_layers": 2},
                                             vision_overrides={"num_hidden_layers": 12})
    return model.to(device).eval(), processor, dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--questions", type=int, default=None, help="default 192 (tiny) / 64 (0.5b)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from llavamed_core.data.synth import SynthConfig, make_synthetic_vqa
    from llavamed_core.eval.answers import VQAEvalConfig, answer_questions, load_image, load_questions
    from llavamed_core.infer import Engine

    n = args.questions or (192 if args.size == "tiny" else 64)
    t0 = time.perf_counter()
    model, processor, dtype = _build(args.size, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, processor, model_name=f"random-{args.size}")
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_synthetic_vqa(SynthConfig(out=data, n_train=1, n_test=max(8, n // 2), seed=0))
        _kind, questions = load_questions(data / "test.json")
        questions = questions[:n]
        images = {q.image: load_image(data / "images", q, data / "test.json") for q in questions}

        # Warm-up (kernels, allocator) for both paths, not timed.
        cfg_warm = VQAEvalConfig(dataset=data / "test.json", out=Path(tmp) / "warm", limit=4,
                                 max_new_tokens=4, batch_size=4)
        answer_questions(cfg_warm, engine=engine)

        # Baseline: one question at a time, plain transformers generate (the original scripts).
        tok = processor.tokenizer
        tok.padding_side = "left"
        baseline: dict[str, str] = {}
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for q in questions:
                parts = [{"type": "image"}, {"type": "text", "text": q.text}] if q.image_first else \
                        [{"type": "text", "text": q.text + "\n"}, {"type": "image"}]
                prompt = processor.apply_chat_template([{"role": "user", "content": parts}],
                                                       add_generation_prompt=True, tokenize=False)
                enc = processor(text=[prompt], images=[images[q.image]], return_tensors="pt",
                                add_special_tokens=False).to(args.device)
                enc["pixel_values"] = enc["pixel_values"].to(dtype)
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
                baseline[str(q.id)] = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=False).strip()
        sync()
        base_s = time.perf_counter() - t

        # llavamed eval vqa's answer generation: batched engine, same model and questions.
        cfg = VQAEvalConfig(dataset=data / "test.json", out=Path(tmp) / "eval", limit=len(questions),
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        sync()
        t = time.perf_counter()
        run = answer_questions(cfg, engine=engine)
        sync()
        batched_s = time.perf_counter() - t
        ours = {str(o["question_id"]): o["text"]
                for o in map(json.loads, (Path(tmp) / "eval" / "answers.jsonl").read_text().splitlines())}
    same = sum(ours.get(k) == v for k, v in baseline.items())
    fig = {
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "size": args.size, "parameters": n_params, "dtype": str(dtype).replace("torch.", ""),
        "questions": len(questions), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "build_s": round(build_s, 1),
        "cudnn_attention": bool(torch.backends.cuda.cudnn_sdp_enabled()) if args.device.startswith("cuda") else None,
        "one_at_a_time_s": round(base_s, 2), "one_at_a_time_qps": round(len(questions) / base_s, 2),
        "batched_s": round(batched_s, 2), "batched_qps": round(run.answered / batched_s, 2),
        "speedup": round(base_s / batched_s, 2), "same_answers": f"{same}/{len(baseline)}",
    }
    print(f"eval_throughput: {fig['size']} model ({n_params / 1e6:.1f}M params, {fig['dtype']}) on {fig['device']}, "
          f"{fig['questions']} questions, {fig['max_new_tokens']} new tokens, greedy, {fig['threads']} thread(s)")
    print(f"  one at a time, plain generate : {fig['one_at_a_time_qps']:8.2f} questions/s ({fig['one_at_a_time_s']} s)")
    print(f"  eval vqa, batch {fig['batch_size']:<3}          : {fig['batched_qps']:8.2f} questions/s ({fig['batched_s']} s)")
    print(f"  speedup: {fig['speedup']}x   identical answers: {fig['same_answers']}")
    if args.json:
        print(json.dumps(fig))


if __name__ == "__main__":
    main()
